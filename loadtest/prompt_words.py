"""``WordSource``: seeded filler text of a requested number of words, for the synthetic datasets.

Lifecycle: one per dataset build, from the dataset's seed; ``words(n)`` draws ``n`` words from a
fixed list of common English words (about one BPE token each for a real tokenizer; the client never
tokenizes, so a prompt's token count is approximate and the usage reports the real one). Same seed,
same calls -> same text.
"""

from __future__ import annotations

import random

WORDS = tuple(
    """
    the of and to in is was for on are with as at be by this had not but from or have an they which
    one you were all her she there would their we him been has when who will more no if out so said
    what up its about into than them can only other new some could time these two may then do first
    any my now such like our over man me even most made after also did many before must through back
    years where much your way well down should because each just those people how too little state
    good very make world still own see men work long get here between both life being under never day
    same another know while last might us great old year off come since against go came right used
    take three small large next early young important few public bad able number group problem fact
    system program question during government place point case week company hand part child eye woman
    thing member water room mother area money story month lot book job word business issue side kind
    head house service friend father power hour game line end among ever stand find city community name
    president team minute idea kid body information school face others level office door health person
    art war history party result change morning reason research girl guy moment air teacher force order
    education foot boy age policy everything process music market sense nation plan college interest
    death experience effect class control care field development role effort rate heart drug show
    leader light voice wife police mind price report decision son view relationship town road arm
    difference value building action model season society tax director position player record paper
    space ground form event official matter center couple site project activity star table need court
    """.split()
)


class WordSource:
    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def words(self, n: int) -> str:
        return " ".join(self._rng.choice(WORDS) for _ in range(max(0, n)))

    def randint(self, low: int, high: int) -> int:
        return self._rng.randint(low, high)

    def choice(self, options: list[str]) -> str:
        return self._rng.choice(options)

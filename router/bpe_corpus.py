"""The built-in training text for generated test tokenizers (``make-tiny-model``).

A fixed constant, so every generated tiny or small model has the same vocabulary. Written for
this project: English prose, Python and shell code, JSON, numbers, chat and tool-call shaped text,
and some Chinese, Japanese, Korean, Russian, Greek, Arabic, Hindi and emoji, so that trained
merges cover the kinds of text the tests and benchmarks send. Changing it changes every
generated vocabulary (and thus every golden token sequence derived from one).
"""

from __future__ import annotations

BUILTIN_CORPUS = (
    r'''
The router receives a request, renders the chat template, and turns the prompt into token ids.
Then it picks a prefill rank that already holds the longest prefix of the prompt in its cache.
The prefill rank computes the first token and hands the latent cache over to a decode rank.
The decode rank streams the remaining tokens back, one step at a time, until a stop token appears.
When the client disconnects, the request is aborted everywhere and its cache blocks are freed.

A good serving system is boring: it does the same thing every time, and it tells you when it cannot.
It should never block the event loop, never lose a request silently, and never leak memory.
Latency is measured in two parts: the time to the first token, and the time between tokens.
Throughput is the number of tokens produced per second across all requests on all machines.
If the batch is too small, the accelerators idle; if it is too large, every user waits longer.
Scheduling is therefore a trade-off between fairness, latency, and the total amount of work done.

Once upon a time, a small model lived in a test folder. It had only three layers and eight experts,
but it knew the same rules as its enormous cousin: rotary positions, latent attention, sigmoid routing.
Every morning the tests woke it up, asked it a few questions, and compared its answers token by token.
It never complained. It simply multiplied small matrices and returned the same numbers every time.

Why does this matter? Because a bug that hides in a tiny model will also hide in a big one, and
it is far cheaper to find it on a laptop than on a rack of machines that costs money every hour.
We write the test first, we watch it fail, and then we make it pass. That's the whole trick, isn't it?
She said: "I'll check the logs." He replied: 'We've already checked them; they're clean.'
They'd been debugging since Monday; it's Thursday now, and nobody's slept much.

Numbers appear everywhere: 0, 1, 2, 3, 10, 42, 100, 256, 512, 768, 1024, 2048, 4096, 8192, 16384,
32768, 65536, 131072, 262144, 163584, 163839, 3.14159, 2.71828, -17, +23, 1e-6, 6.02e23, 0x1F, 0b1011.
Prices: $19.99, EUR 42.50, 7%, 12.5%, 99.9% uptime. Dates: 2025-11-06, 2026-01-15T08:30:00Z.
Phone: +1 (555) 010-2368. Version 0.14.0, release v2.4.1, build 20251122, port 8000, 50051, 9090.
Temperatures: -40, 0, 18, 21.5, 37 degrees; distances: 3 km, 42.195 km, 384,400 km to the Moon.

def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
    """Return the token ids of text."""
    ids: list[int] = []
    for piece in self._pieces(text):
        ids.extend(self._encoding.encode(piece))
    return ids


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks = list(range(num_blocks))

    def allocate(self, num_tokens: int) -> list[int]:
        needed = (num_tokens + self.block_size - 1) // self.block_size
        if needed > len(self.free_blocks):
            raise RuntimeError(f"out of blocks: need {needed}, have {len(self.free_blocks)}")
        blocks, self.free_blocks = self.free_blocks[:needed], self.free_blocks[needed:]
        return blocks

    def free(self, blocks: list[int]) -> None:
        self.free_blocks.extend(blocks)


async def stream(request_id: str, queue: asyncio.Queue[str | None]) -> AsyncIterator[str]:
    while (chunk := await queue.get()) is not None:
        yield f"data: {json.dumps({'id': request_id, 'delta': chunk})}\n\n"
    yield "data: [DONE]\n\n"


for i in range(10):
    if i % 2 == 0:
        print(i, "is even")
    else:
        print(i, "is odd")

x = [a * b for a, b in zip(xs, ys) if a > 0 and b < 100]
total = sum(x) / max(len(x), 1)
assert total >= 0.0, "total must be non-negative"
result = {"mean": total, "count": len(x), "ok": True, "note": None}

import json
import os
from pathlib import Path

config = json.loads(Path("config.json").read_text())
hidden_size = config["hidden_size"]
num_heads = config.get("num_attention_heads", 64)
print(f"hidden_size={hidden_size} num_heads={num_heads} head_dim={hidden_size // num_heads}")

#include <stdio.h>
int main(int argc, char **argv) {
    for (int i = 0; i < argc; ++i) {
        printf("%d: %s\n", i, argv[i]);
    }
    return 0;
}

fn main() {
    let v: Vec<u32> = (1..=10).map(|x| x * x).collect();
    println!("{:?}", v);
}

function add(a, b) { return a + b; }
const items = [1, 2, 3].map((n) => n * 2).filter((n) => n > 2);
console.log(`items: ${items.join(", ")}`);

SELECT user_id, COUNT(*) AS num_requests FROM requests WHERE created_at > '2025-01-01' GROUP BY user_id ORDER BY num_requests DESC LIMIT 10;

$ pip install -e ".[test]"
$ python -m pytest tests -q -m "not slow"
$ k2serve serve --model ./tiny --port 8000 --max-num-seqs 64
$ curl -s http://localhost:8000/v1/chat/completions -H "Content-Type: application/json" -d @request.json | jq .
$ kubectl get pods -n k2serve -o wide && helm upgrade --install k2serve ./chart -f values.yaml
$ git log --oneline | head -n 5; ls -la /tmp; echo "$HOME" >> ~/.profile

{"model": "kimi-k2-thinking", "messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is the capital of France?"}], "temperature": 1.0, "top_p": 1.0, "max_tokens": 32000, "stream": true}
{"id": "chatcmpl-7f3a", "object": "chat.completion.chunk", "created": 1763800000, "choices": [{"index": 0, "delta": {"reasoning_content": "The user asks about France."}, "finish_reason": null}]}
{"id": "chatcmpl-7f3a", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 31, "completion_tokens": 12, "total_tokens": 43}}
{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
{"type": "function", "function": {"name": "search_web", "description": "Search the web and return the top results", "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "max_results": {"type": "integer", "minimum": 1, "maximum": 20}}, "required": ["query"]}}}
{"error": {"message": "messages[2].tool_call_id is required", "type": "invalid_request_error", "param": "messages", "code": 400}}
{"hidden_size": 7168, "num_hidden_layers": 61, "n_routed_experts": 384, "num_experts_per_tok": 8, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "vocab_size": 163840}

<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
<|im_user|>user<|im_middle|>What's the weather like in Paris today?<|im_end|>
<|im_assistant|>assistant<|im_middle|><think>The user wants the weather. I should call the tool.</think>
<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>
<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0
{"temp_c": 18, "condition": "cloudy", "humidity": 72}<|im_end|>
<|im_assistant|>assistant<|im_middle|><think>It is 18 degrees and cloudy.</think>It is 18 °C and cloudy in Paris right now.<|im_end|>
<|im_user|>user<|im_middle|>Search for the latest news about electric cars.<|im_end|>
<|im_assistant|>assistant<|im_middle|><think>I will search the web.</think><|tool_calls_section_begin|><|tool_call_begin|>functions.search_web:1<|tool_call_argument_begin|>{"query": "electric cars news", "max_results": 5}<|tool_call_end|><|tool_calls_section_end|><|im_end|>

User: Can you summarize this paragraph in one sentence?
Assistant: Sure. The paragraph argues that small, well-tested components make large systems reliable.
User: Thanks! Now translate it into French.
Assistant: Bien sûr : le paragraphe soutient que de petits composants bien testés rendent les grands systèmes fiables.
User: And into German?
Assistant: Gern: Der Absatz argumentiert, dass kleine, gut getestete Komponenten große Systeme zuverlässig machen.
User: Spanish, please.
Assistant: Claro: el párrafo sostiene que los componentes pequeños y bien probados hacen que los grandes sistemas sean fiables.

人工智能正在改变我们的生活方式。这个模型可以回答问题、编写代码、翻译文本，还可以调用工具完成复杂的任务。
今天北京的天气晴朗，气温大约十八度。我们计划下午去公园散步，然后在附近的餐厅吃晚饭。
服务器收到请求以后，先渲染对话模板，再把文本切分成词元，最后把词元发送给预填充节点。
如果客户端断开连接，系统会立即中止请求并释放缓存。测试通过了，我们明天继续优化性能。
你好，世界！请问你叫什么名字？我叫小明，我来自上海，很高兴认识你。

日本語のテキストも少し入れておきます。今日はとても良い天気ですね。東京の桜はもうすぐ咲きます。
プログラムを書いて、テストを実行して、結果を確認しましょう。ありがとうございました。

한국어 문장도 조금 있습니다. 오늘 날씨가 정말 좋네요. 서울에서 만나요. 감사합니다.

Русский текст: Сервер принимает запрос, строит подсказку и отправляет её на обработку. Спасибо за помощь!
Модель отвечает быстро, а тесты проходят за несколько секунд. Добро пожаловать в Москву.

Ελληνικά: Το μοντέλο απαντά γρήγορα και οι δοκιμές περνούν. Καλημέρα, κόσμε!

العربية: مرحبا بالعالم. النموذج يجيب عن الأسئلة ويكتب الشيفرة. شكرا جزيلا.

हिन्दी: नमस्ते दुनिया। यह मॉडल सवालों के जवाब देता है और कोड लिखता है। धन्यवाद।

Emoji and symbols: 😀 😂 🎉 🚀 ❤️ 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ✅ ❌ ⚠️ → ← ↑ ↓ ≤ ≥ ≠ ± × ÷ ∑ ∫ √ ∞ π µ © ® ™ € £ ¥ § ¶ • … “quotes” ‘single’ «guillemets» — en–dash.
Accents: café, naïve, résumé, jalapeño, Zürich, Kraków, São Paulo, Ångström, Øresund, façade, coöperate.
Vietnamese: Tiếng Việt rất hay, cảm ơn bạn.

Markdown:
# Title
## Section 1.2
- item one
- item two
  - nested item
1. first
2. second

| name | value |
|------|-------|
| temperature | 1.0 |
| top_p | 0.95 |

**Bold**, _italic_, `inline code`, [a link](https://example.com/docs?page=2&lang=en#intro), ~~strike~~.
> A quoted line, followed by a horizontal rule.
---

YAML:
router:
  port: 8000
  max_num_seqs: 256
pools:
  - name: prefill
    replicas: 2
    gpus_per_replica: 8
  - name: decode
    replicas: 4

Logs:
2026-01-15 08:30:01,123 INFO router: request abc123 prompt_tokens=1024 ttft_ms=85.2
2026-01-15 08:30:01,456 WARNING scheduler: preempting request def456 (num_computed_tokens=4096)
2026-01-15 08:30:02,789 ERROR worker[3]: CUDA out of memory; retrying with a smaller batch
Traceback (most recent call last):
  File "engine.py", line 142, in step
    outputs = self.model(input_ids, positions)
ValueError: expected shape [T, H], got [T, H, 2]

The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!
Pack my box with five dozen liquor jugs. How vexingly quick daft zebras jump? Sphinx of black quartz, judge my vow.
CamelCaseName snake_case_name kebab-case-name SCREAMING_SNAKE_CASE dotted.module.name path/to/file.py
https://github.com/owner/repo/blob/main/README.md user@example.com 192.168.1.10:8080 /usr/local/bin

In the morning the team met to review the design. The first question was simple: where does each
idea live? The answer was a table: one file per noun, one noun per idea, and no clever mixins.
The second question was harder: how do we know the distributed version is right? The answer was
an oracle: greedy decoding on a single process, reproduced token for token by every other setup.
Batching, chunked prefill, prefix caching, preemption, expert parallelism, and disaggregation all
have to reproduce it exactly, or the test fails and somebody reads a diff of token ids.

Questions people ask: How long is the context? What happens when it is full? Can I stream?
Does it support tools? What about images? Which temperature should I use? Is it deterministic?
Answers: 262,144 tokens; the request is rejected; yes; yes; partially; 1.0; only with greedy decoding.

Whitespace matters too:	tabs	between	words, and a line that ends in spaces:
    indented lines, blank lines,


plus runs of          spaces and dots.......... and dashes ----------.
'''
    # Escapes that a raw string cannot hold: combining marks, CRLF line ends, control characters.
    "Combining marks: e\u0301 a\u0308 n\u0303 o\u0302 u\u0308\u0301; Hangul jamo: \u1100\u1161\u11a8.\r\n"
    "Trailing spaces   \nWindows line endings\r\nare common in pasted text.\r\n\r\nA form feed\x0c, a vertical tab\x0b, a NUL-free tab\there.\n"
)

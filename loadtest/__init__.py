"""Load-generation clients: the sweep benchmark and locust files (arrive with the operations issue)."""

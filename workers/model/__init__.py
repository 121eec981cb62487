"""The Kimi K2 / DeepSeek-V3 forward pass in plain PyTorch, free of serving concerns."""

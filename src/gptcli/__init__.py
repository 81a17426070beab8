"""gptcli: pretrain GPT-1 and GPT-2 style language models from scratch, and use them."""

__version__ = "0.1.0"

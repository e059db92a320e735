"""Data modules: SmolTalk conversations, preference pairs, prompts."""

from synpref.data.smoltalk import SmolTalkDataModule

__all__ = ["SmolTalkDataModule"]

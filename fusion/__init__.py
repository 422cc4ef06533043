"""The early-fusion decoder and everything around it. Importing the package registers the exported model type
("vqfusion", fusion/hf.py) with transformers' AutoConfig / AutoModelForCausalLM."""

from fusion.hf import register as _register

_register()

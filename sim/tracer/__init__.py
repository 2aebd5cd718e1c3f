"""The tracer: run a live Hugging Face MoE checkpoint and record what its routers do.

Modules (one concept each; all of them import torch, nothing else in `sim/` imports this package
at module level):

- `families/`  one small adapter per model family: where the MoE blocks, routers and experts are,
               the routing rule's name, shared experts, dense layers, and how to run one expert
- `loader`     load a local checkpoint + tokenizer, refuse what we cannot trace (`UserError`)
- `prompts`    split a text file into equal-length token prompts (deterministic)
- `capture`    forward hooks that record MoE inputs / router outputs, add gradient taps on MoE
               outputs, or perturb a router's decision at chosen positions
- `core`       prefill + greedy decode with the KV cache, pre-gating logits, and the Fisher pass
- `build`      turn the per-batch arrays into a `sim.trace.format.Trace`
- `fisher_check`  drop experts for real and compare with the Fisher estimates

What exactly is computed is documented in `docs/tracer.md`.
"""

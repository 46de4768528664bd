"""A local Hugging Face language model fine-tuned on event texts, and the user embeddings read from it
(LLM4ES, Shestov et al., §3.2-3.3).

    lm = load_lm(model_dir)                      # AutoModelForCausalLM or AutoModel, local_files_only
    enc = encode_texts(lm.tokenizer, headers, bodies, max_tokens=512)
    result = finetune(lm, enc, FinetuneConfig(steps=200))      # next-token loss, AdamW
    emb = embed_encoded(lm, enc, n_layers=4)     # (N, D) float32
    save_lm(lm, out_dir)

Nothing is downloaded: every load passes `local_files_only=True` and a directory.

Embedding (paper: "mean over tokens of the hidden states, averaged over the last layers"): the hidden
states of the last `n_layers` transformer layers (all of them when the model has fewer; the embedding
layer's output is not a layer) are averaged, then averaged over the non-pad tokens: (B, T, D) -> (B, D).

Kinds: `causal` models (a `...ForCausalLM` / `...LMHeadModel` architecture) are fine-tuned and embedded;
`encoder` models (e.g. all-MiniLM-L6-v2, `BertModel`) only embed. `auto` reads `architectures` in
config.json.

Truncation keeps the newest events: a user's header (profile) and body (events, oldest first) are
tokenized as a pair within `max_tokens`; the body loses its oldest lines (whole lines), the header stays.
To bound tokenizer time, a body is first cut to its last `max_tokens * CHARS_PER_TOKEN` characters (at a
line start); the few texts that then come out clearly short of `max_tokens` are redone with 4x as many.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from pantherseq.errors import ConfigError

log = logging.getLogger(__name__)
KINDS = ("auto", "causal", "encoder")
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
CHARS_PER_TOKEN = 4  # characters per token assumed by the pre-cut of long bodies (redone when too few)
IGNORE = -100  # label of pad positions (Hugging Face's ignore_index)


@dataclass
class FinetuneConfig:
    """Next-token fine-tuning. Stops after `steps` optimizer steps or `budget_s` seconds, whichever
    comes first (0 = no limit; at least one must be set). One step = `grad_accum` batches of `batch_size`
    users. Learning rate: linear warm-up over `warmup_steps`, then constant."""

    steps: int = 100
    budget_s: float = 0.0
    batch_size: int = 4
    grad_accum: int = 4
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10
    clip: float = 1.0
    max_tokens: int = 512
    seed: int = 0

    def validate(self, where: str) -> None:
        if self.steps < 0 or self.budget_s < 0 or (self.steps == 0 and self.budget_s == 0):
            raise ConfigError(f"{where}: give steps > 0 or budget_s > 0 (got steps {self.steps}, "
                              f"budget_s {self.budget_s})")
        if min(self.batch_size, self.grad_accum, self.max_tokens) < 1 or self.lr <= 0:
            raise ConfigError(f"{where}: batch_size, grad_accum, max_tokens and lr must be positive")


@dataclass
class LoadedLM:
    model: Any  # a transformers PreTrainedModel, float32, on CPU
    tokenizer: Any
    kind: Literal["causal", "encoder"]
    model_dir: Path

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


@dataclass
class Encoded:
    """Token ids of N texts (unpadded, each <= max_tokens) and, for pair-aware encoders, segment ids."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


# -- loading ------------------------------------------------------------------------------------------
def import_transformers() -> Any:
    """transformers, quiet (errors only, no per-load progress bars), or a ConfigError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("LLM4ES needs transformers: pip install 'pantherseq[llm]'") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # per-load weight bars; ours report the work
    return transformers


def model_kind(config: Any, kind: str = "auto") -> Literal["causal", "encoder"]:
    if kind not in KINDS:
        raise ConfigError(f"unknown model kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind  # type: ignore[return-value]
    archs = getattr(config, "architectures", None) or []
    return "causal" if any(a.endswith(CAUSAL_SUFFIXES) for a in archs) else "encoder"


def load_lm(model_dir: str | Path, kind: str = "auto") -> LoadedLM:
    """A model + tokenizer from a local Hugging Face directory (config.json, weights, tokenizer files)."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise ConfigError(f"model directory {path} {what}: give a local Hugging Face model directory")
    tf = import_transformers()
    try:
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
        resolved = model_kind(config, kind)
        tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
        auto = tf.AutoModelForCausalLM if resolved == "causal" else tf.AutoModel
        model = auto.from_pretrained(path, local_files_only=True).float()
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot load a model from {path}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"the tokenizer in {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.truncation_side = "left"  # keep the newest events
    model.eval()
    log.info("loaded %s model %s (%s, %.1fM parameters)", resolved, path, type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6)
    return LoadedLM(model, tokenizer, resolved, path)


def save_lm(lm: LoadedLM, out: str | Path, info: dict[str, Any] | None = None) -> Path:
    """The model and tokenizer in Hugging Face format (loadable by `load_lm`), `llm4es.json` beside them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    meta = {"kind": lm.kind, "base_model_dir": str(lm.model_dir), **(info or {})}
    (out / "llm4es.json").write_text(json.dumps(meta, indent=1, default=str))
    return out


# -- tokens -------------------------------------------------------------------------------------------
def _tail(body: str, limit: int) -> str:
    if len(body) <= limit:
        return body
    cut = body[-limit:]
    nl = cut.find("\n")
    return cut[nl + 1:] if 0 <= nl < len(cut) - 1 else cut


def _whole_lines(tokenizer: Any, heads: list[str], bodies: list[str], max_tokens: int) -> list[str]:
    """Each body from its first line start after which it fits `max_tokens` with its header and the
    special tokens (a margin of 2 tokens absorbs merges that change at the cut)."""
    special = tokenizer.num_special_tokens_to_add(pair=True)
    head_len = [len(x) for x in tokenizer(heads, add_special_tokens=False)["input_ids"]]
    offsets = tokenizer(bodies, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    out = []
    for body, spans, h in zip(bodies, offsets, head_len):
        budget = max_tokens - special - h - 2
        if len(spans) <= budget + 2:
            out.append(body)
            continue
        start = spans[len(spans) - budget][0] if budget > 0 else len(body)
        nl = body.find("\n", max(start - 1, 0))
        out.append(body[nl + 1:] if 0 <= nl < len(body) - 1 else body[body.rfind("\n") + 1:])
    return out


def _encode_pairs(tokenizer: Any, heads: list[str], tails: list[str], max_tokens: int, batch_size: int
                  ) -> tuple[list[list[int]], list[list[int]]]:
    ids: list[list[int]] = []
    types: list[list[int]] = []
    for i in range(0, len(heads), batch_size):
        h, b = heads[i:i + batch_size], tails[i:i + batch_size]
        out = tokenizer(h, _whole_lines(tokenizer, h, b, max_tokens), truncation="longest_first",
                        max_length=max_tokens)
        ids += out["input_ids"]
        types += out.get("token_type_ids") or []
    return ids, types


def encode_texts(tokenizer: Any, headers: list[str], bodies: list[str], max_tokens: int = 512,
                 batch_size: int = 256) -> Encoded:
    """Tokenize (header, body) pairs within `max_tokens`: the body loses its oldest lines first, whole
    (a single line too long for the budget is truncated from the left)."""
    if len(headers) != len(bodies):
        raise ValueError(f"{len(headers)} headers but {len(bodies)} bodies")
    limit = max_tokens * CHARS_PER_TOKEN
    heads = [h + "\n" if h else "" for h in headers]
    ids, types = _encode_pairs(tokenizer, heads, [_tail(b, limit) for b in bodies], max_tokens, batch_size)
    redo = [i for i, b in enumerate(bodies) if len(b) > limit and len(ids[i]) < 0.9 * max_tokens]
    if redo:
        more, more_types = _encode_pairs(tokenizer, [heads[i] for i in redo],
                                         [_tail(bodies[i], 4 * limit) for i in redo], max_tokens, batch_size)
        for j, i in enumerate(redo):
            ids[i] = more[j]
            if types:
                types[i] = more_types[j]
    return Encoded(ids, types if len(types) == len(ids) else None)


def collate(enc: Encoded, rows: np.ndarray | list[int], pad_id: int, with_types: bool
            ) -> dict[str, torch.Tensor]:
    """Right-padded tensors (B, T) of the chosen rows: input_ids, attention_mask (1 = token, 0 = pad)."""
    seqs = [enc.input_ids[i] for i in rows]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, :len(s)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if with_types and enc.token_type_ids is not None:
        types = torch.zeros_like(ids)
        for b, i in enumerate(rows):
            types[b, :len(enc.token_type_ids[i])] = torch.tensor(enc.token_type_ids[i], dtype=torch.long)
        batch["token_type_ids"] = types
    return batch


# -- fine-tuning --------------------------------------------------------------------------------------
def _lr(step: int, cfg: FinetuneConfig) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    """Endless batches of row indices: shuffled passes over the N texts."""
    while True:
        order = rng.permutation(n)
        for i in range(0, n, batch_size):
            rows = order[i:i + batch_size]
            if len(rows) == batch_size or n < batch_size:
                yield rows


def lm_loss(lm: LoadedLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-pad tokens of a batch (labels shift inside the model)."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
    return lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss


def finetune(lm: LoadedLM, enc: Encoded, cfg: FinetuneConfig | None = None, progress: bool = True
             ) -> dict[str, Any]:
    """Fine-tune a causal LM in place with next-token loss. Returns steps, seconds, tokens, losses."""
    cfg = cfg or FinetuneConfig()
    if lm.kind != "causal":
        raise ConfigError(f"{lm.model_dir} is an encoder model: it embeds but cannot be fine-tuned with "
                          "next-token loss (use --no-finetune or a causal LM)")
    if len(enc) == 0:
        raise ConfigError("no texts to fine-tune on")
    torch.manual_seed(cfg.seed)
    batches = _batches(len(enc), cfg.batch_size, np.random.default_rng(cfg.seed))
    params = [p for p in lm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    pad = int(lm.tokenizer.pad_token_id)
    losses: list[float] = []
    tokens, started = 0, time.perf_counter()
    lm.model.train()
    bar = tqdm(total=cfg.steps or None, desc="llm4es fine-tune", disable=None if progress else True,
               leave=False, mininterval=1.0)
    step = 0
    while (cfg.steps == 0 or step < cfg.steps) and not (
            cfg.budget_s and time.perf_counter() - started >= cfg.budget_s):
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(cfg.grad_accum):
            batch = collate(enc, next(batches), pad, with_types=False)
            loss = lm_loss(lm, batch)
            (loss / cfg.grad_accum).backward()
            total += float(loss.detach())
            tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        losses.append(total / cfg.grad_accum)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    lm.model.eval()
    seconds = time.perf_counter() - started
    log.info("fine-tuned %d steps in %.0f s: loss %.3f -> %.3f", step, seconds, losses[0], losses[-1])
    return {"steps": step, "seconds": round(seconds, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / max(seconds, 1e-9), 1), "loss_first": losses[0],
            "loss_last": losses[-1], "losses": [round(x, 5) for x in losses]}


@torch.no_grad()
def mean_loss(lm: LoadedLM, enc: Encoded, rows: list[int] | np.ndarray, batch_size: int = 8) -> float:
    """Token-weighted mean next-token loss of the chosen texts (model in eval mode)."""
    pad, total, count = int(lm.tokenizer.pad_token_id), 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = collate(enc, rows[i:i + batch_size], pad, with_types=False)
        n = int(batch["attention_mask"][:, 1:].sum())
        total += float(lm_loss(lm, batch)) * n
        count += n
    return total / max(count, 1)


# -- embeddings ---------------------------------------------------------------------------------------
def used_layers(lm: LoadedLM, n_layers: int) -> int:
    """How many layers the embedding averages: `n_layers`, or all of them when the model has fewer."""
    n = int(getattr(lm.model.config, "num_hidden_layers", 0) or 0)
    return max(1, min(n_layers, n)) if n else max(1, n_layers)


@torch.no_grad()
def embed_encoded(lm: LoadedLM, enc: Encoded, n_layers: int = 4, batch_size: int = 8,
                  progress: bool = True) -> np.ndarray:
    """(N, D) float32: per text, the mean over non-pad tokens of the mean of the last `n_layers` layers'
    hidden states. Texts are batched by length (less padding); row i is text i."""
    lm.model.eval()
    base = lm.model.base_model if lm.kind == "causal" else lm.model  # the LM head is not needed
    pad = int(lm.tokenizer.pad_token_id)
    order = np.argsort([len(s) for s in enc.input_ids], kind="stable")
    out = np.zeros((len(enc), lm.hidden_size), np.float32)
    k = None
    for i in tqdm(range(0, len(order), batch_size), desc="llm4es embed", disable=None if progress else True,
                  leave=False, mininterval=1.0):
        rows = order[i:i + batch_size]
        batch = collate(enc, rows, pad, with_types=lm.kind == "encoder")
        hidden = base(**batch, output_hidden_states=True).hidden_states  # (L + 1) x (B, T, D)
        k = k or min(used_layers(lm, n_layers), len(hidden) - 1)
        h = torch.stack(hidden[-k:]).mean(0)  # (B, T, D)
        mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        out[rows] = ((h * mask).sum(1) / mask.sum(1).clamp(min=1)).float().numpy()
    if not np.isfinite(out).all():
        raise FloatingPointError("non-finite user embeddings")
    return out


def n_params(lm: LoadedLM) -> int:
    return int(sum(p.numel() for p in lm.model.parameters()))


def describe(lm: LoadedLM) -> dict[str, Any]:
    c = lm.model.config
    return {"kind": lm.kind, "architecture": type(lm.model).__name__, "params": n_params(lm),
            "hidden_size": lm.hidden_size, "layers": used_layers(lm, 10 ** 6),
            "vocab_size": int(getattr(c, "vocab_size", 0) or 0)}

"""RHO-1: selective language modelling with a static reference model (Lin et al., NeurIPS 2024; METHODS §3).

Objective. A reference model θ_ref is trained on a high-quality set, starting from the same point as the target and
with the same tokenizer. During target training every next-token prediction j of the batch gets the excess loss

    s_j = CE_j(θ_target) − CE_j(θ_ref)                     (the paper's excess loss L_Δ = L_θ − L_RM)

and the training loss averages the target's CE over the top-k % tokens of the **batch** only (the paper's SLM loss):

    L_SLM(θ) = 1 / (k% · N) · Σ_j  I_{k%}(x_j) · CE_j(θ),   I_{k%}(x_j) = 1 if s_j is in the top k % of the batch.

Full sequences are always fed; only the loss of dropped tokens is masked (the training loop does the averaging).

Mask definition (exactly :func:`lmselect.train.hooks.topk_token_mask`): the selector only supplies the scores
(:meth:`Rho1Selector.token_scores`, per micro-batch); the training loop takes the top-k over all B·(L−1) predictions
of the **global** batch (every micro-batch of every rank), k = max(1, round(keep_fraction · n)) with Python's
``round`` (half to even); the k largest excess losses are kept and ties are broken by global position (earlier
sequence of the global batch / earlier token first), i.e. the result equals a stable descending sort of the batch.

The reference is frozen (eval mode, ``requires_grad=False``, no autograd graph). Its per-token losses can be
precomputed once with :func:`precompute_reference_losses`; since the :class:`~lmselect.train.hooks.TokenSelector`
contract hands the selector ``input_ids`` and no sequence ids, the cache is looked up by a hash of the token row.
The cache stores float16 losses, so it is an *approximation* of the on-the-fly value (about 3 significant digits):
tokens whose excess losses differ by less than that may swap in and out of the mask. It is off by default.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from lmselect.artifacts import LmselectError, Manifest, atomic_path, is_complete, read_manifest, write_manifest
from lmselect.config import check_fraction, dump_yaml, replace, to_dict
from lmselect.context import STREAM_REFERENCE, FlopContext, RoundContext
from lmselect.data.tokenizer import tokenizer_fingerprint
from lmselect.data.valset import ValidationSet, read_texts
from lmselect.log import Progress
from lmselect.models.losses import token_ce
from lmselect.models.util import freeze
from lmselect.select.base import SelectionMethod, register
from lmselect.train.checkpoint import (
    load_checkpoint_model,
    load_partial_state,
    rng_state,
    save_partial_state,
    set_rng_state,
    state_fingerprint,
)
from lmselect.train.hooks import TokenSelector
from lmselect.train.loop import PreemptionGuard

# the reference's training state while it trains (inside its directory, which has no manifest until the finished
# reference replaces the whole directory): saved by the preemption rule, never read as a reference
REFERENCE_PARTIAL = "reference_state.pt"


@dataclass
class Rho1Config:
    keep_fraction: float = 0.6  # paper: 0.6 at 1B, 0.7 at 7B
    # reference training: AdamW on the high-quality text, starting from the target's (warm-up) checkpoint
    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 8
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    files: list[str] = field(default_factory=list)  # reference corpus (.jsonl/.txt); empty = the selection set's text; never a report set
    seq_len: int = 256  # packing length for text read from ``files`` / given as strings
    seed: int = 0


# ----------------------------------------------------------------------------------------------------------------
# reference training


def _sequences_from_valset(valset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [N, L], loss mask [N, L-1]) for training on a ValidationSet's **whole** passages.

    The validation mask (e.g. LAMBADA's final word) only says what the selection target scores; the reference should
    model the high-quality text itself, so it trains on every real (non-padding) prediction: positions up to and
    including the last masked one of each row (rows are right-padded, and the final word ends each passage).
    """
    ids = valset.input_ids
    m = valset.loss_mask
    pos = torch.arange(m.shape[1]).expand_as(m)
    last = torch.where(m, pos, torch.full_like(pos, -1)).max(dim=1).values  # [N]
    mask = pos <= last.unsqueeze(1)
    return ids, mask


def _sequences_from_texts(texts: Sequence[str], tokenizer: Any, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack documents (each followed by EOS) into [N, seq_len] rows, like the pool does; every prediction counts."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream: list[int] = []
    for t in texts:
        stream += tokenizer.encode(t, add_special_tokens=False) + [eos]
    n = len(stream) // seq_len
    if n == 0:  # less text than one row: a single short row
        if len(stream) < 2:
            raise LmselectError("reference text is too short to train on (fewer than 2 tokens)")
        ids = torch.tensor([stream], dtype=torch.long)
    else:
        ids = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return ids, torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)


def load_reference(path: str | Path, device: Any = None) -> nn.Module:
    """A complete reference checkpoint (manifest kind="reference"), frozen."""
    from transformers import AutoModelForCausalLM

    read_manifest(path, kind="reference")
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    return freeze(model.to(device) if device is not None else model)


def train_reference(
    cfg: Any,
    init_model: nn.Module,
    texts_or_valset: Any,
    tokenizer: Any,
    out_dir: str | Path,
    device: Any = None,
    *,
    method: str = "rho1",
) -> nn.Module:
    """Train the RHO-1 reference: a copy of ``init_model`` trained for ``cfg.steps`` AdamW steps on high-quality text.

    ``cfg``: a :class:`Rho1Config`, or any config with its reference-training fields (``steps``, ``lr``,
    ``batch_size``, ``weight_decay``, ``betas``, ``grad_clip``, ``files``, ``seq_len``, ``seed``; the ``reference``
    method's); ``method`` is recorded in the manifest.

    Text source: ``cfg.files`` when given, else ``texts_or_valset`` (a ``ValidationSet`` -> its whole passages, or a
    list of strings). Batches are drawn uniformly with replacement from a generator seeded with ``cfg.seed``
    (offset 0). ``init_model`` is not modified. The result is saved as an HF checkpoint directory (config, weights,
    tokenizer, ``ref_log.jsonl``) with manifest kind="reference"; if ``out_dir`` already holds a complete one it is
    loaded instead. Preemption (``train.loop.PreemptionGuard``): the training state (model, optimizer, step, batch
    generator, RNG, log) is saved to ``out_dir/reference_state.pt`` on SIGTERM (which then stops the training in one
    line) and at least every ``$LMSELECT_CHECKPOINT_EVERY_S`` seconds; a rerun with the same inputs resumes there
    and ends with the weights of an uninterrupted run, bit for bit. Until the finished reference replaces the
    directory it has no manifest, so a partial one is never loaded as a reference.
    Returns the frozen reference (eval mode, no grad).
    """
    out_dir = Path(out_dir)
    if is_complete(out_dir, kind="reference"):
        return load_reference(out_dir, device)

    if cfg.files:
        texts = [t for f in cfg.files for t in read_texts(Path(f))]
        ids, mask = _sequences_from_texts(texts, tokenizer, cfg.seq_len)
        source = ",".join(cfg.files)
    elif isinstance(texts_or_valset, ValidationSet):
        ids, mask = _sequences_from_valset(texts_or_valset)
        source = texts_or_valset.source
    elif texts_or_valset is not None:
        ids, mask = _sequences_from_texts(list(texts_or_valset), tokenizer, cfg.seq_len)
        source = "texts"
    else:
        raise LmselectError("RHO-1 reference: no text to train on (set rho1.files or pass the validation set)")

    device = torch.device(device) if device is not None else next(init_model.parameters()).device
    model = copy.deepcopy(init_model).to(device)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    log: list[str] = []
    loss_val = float("nan")
    done, seconds_before = 0, 0.0
    partial = out_dir / REFERENCE_PARTIAL
    key = state_fingerprint(to_dict(cfg), str(device), init_model, ids, mask)
    st = load_partial_state(partial, key, "the reference training")
    if st is not None:  # resume: everything the remaining steps read
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        gen.set_state(st["generator"])
        set_rng_state(st["rng"])
        done, log, loss_val, seconds_before = int(st["step"]), list(st["log"]), float(st["loss"]), float(st["seconds"])
    t0 = time.perf_counter()

    def save() -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_partial_state(partial, {
            "key": key, "step": done, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "generator": gen.get_state(), "rng": rng_state(), "log": log, "loss": loss_val,
            "seconds": seconds_before + time.perf_counter() - t0,
        })

    with PreemptionGuard() as guard, Progress(cfg.steps, initial=done, desc=f"{method} reference", unit="step") as bar:
        while done < cfg.steps:
            rows = torch.randint(0, ids.shape[0], (cfg.batch_size,), generator=gen)
            x, m = ids[rows].to(device), mask[rows].to(device)
            ce = token_ce(model(input_ids=x).logits, x)
            loss = (ce * m).sum() / m.sum().clamp_min(1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip and cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            loss_val = float(loss.detach())
            done += 1
            log.append(f'{{"step": {done}, "loss": {loss_val:.6f}}}')
            bar.update(1)
            guard.checkpoint(save, lambda d=done: f"{method} reference {out_dir}: stopped at step {d} of {cfg.steps}")
    seconds = seconds_before + time.perf_counter() - t0
    freeze(model)

    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "ref_log.jsonl").write_text("\n".join(log) + ("\n" if log else ""))
        (tmp / "config.yaml").write_text(dump_yaml(cfg))
        write_manifest(
            tmp,
            Manifest(
                kind="reference",
                config=to_dict(cfg),
                seed=cfg.seed,
                counts={"steps": cfg.steps, "train_sequences": int(ids.shape[0]), "train_tokens": int(mask.sum())},
                timings={"train_s": seconds},
                extra={
                    "method": method,
                    "final_loss": loss_val,
                    "source": source,
                    "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
                },
            ),
        )
    return model


# ----------------------------------------------------------------------------------------------------------------
# optional cache of reference token losses


def row_key(row: np.ndarray) -> bytes:
    """Cache key of one token row: blake2b-128 of its int64 bytes (independent of the pool's storage dtype)."""
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.int64).tobytes(), digest_size=16).digest()


@torch.no_grad()
def reference_token_ce(reference: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token CE [B, L-1] of the frozen reference (eval mode, no grad), float32."""
    was = reference.training
    reference.eval()
    dev = next(reference.parameters()).device
    ce = token_ce(reference(input_ids=input_ids.to(dev)).logits, input_ids.to(dev)).float()
    reference.train(was)
    return ce.to(input_ids.device)


def precompute_reference_losses(
    ref_model: nn.Module, pool: Any, ids: np.ndarray, out_path: str | Path, batch_size: int = 32, device: Any = None
) -> Path:
    """Write the reference's per-token losses of pool rows ``ids`` to a directory (atomically):

    ``losses.npy`` float16 [n, L-1] (opened later as a memmap), ``seq_ids.npy`` int64 [n], manifest kind="reference"
    with ``extra.content = "token_losses"``. Skipped when ``out_path`` is already complete.
    """
    out_path = Path(out_path)
    if is_complete(out_path, kind="reference"):
        return out_path
    ids = np.asarray(ids, dtype=np.int64)
    if device is not None:
        ref_model = ref_model.to(device)
    freeze(ref_model)
    with atomic_path(out_path) as tmp:
        tmp.mkdir(parents=True)
        arr = np.lib.format.open_memmap(tmp / "losses.npy", mode="w+", dtype=np.float16, shape=(len(ids), pool.seq_len - 1))
        for i in range(0, len(ids), batch_size):
            x = pool.batch(ids[i : i + batch_size])
            arr[i : i + len(x)] = reference_token_ce(ref_model, x).cpu().numpy().astype(np.float16)
        arr.flush()
        del arr
        np.save(tmp / "seq_ids.npy", ids)
        write_manifest(
            tmp,
            Manifest(kind="reference", counts={"sequences": len(ids)}, extra={"content": "token_losses", "pool": str(pool.path)}),
        )
    return out_path


class ReferenceLossCache:
    """Look-up of precomputed reference losses by token row (see :func:`row_key`)."""

    def __init__(self, path: str | Path, pool: Any):
        m = read_manifest(path, kind="reference")
        if m.get("extra", {}).get("content") != "token_losses":
            raise LmselectError(f"{path}: not a reference-loss cache (a reference model checkpoint?)")
        self.losses = np.load(Path(path) / "losses.npy", mmap_mode="r")
        seq_ids = np.load(Path(path) / "seq_ids.npy")
        rows = np.asarray(pool.tokens[seq_ids], dtype=np.int64)
        self.index: dict[bytes, int] = {row_key(r): i for i, r in enumerate(rows)}

    def lookup(self, input_ids: torch.Tensor) -> tuple[np.ndarray, list[int]]:
        """(row index in the cache or -1 for each row, list of rows not found)."""
        rows = input_ids.detach().cpu().numpy()
        idx = np.array([self.index.get(row_key(r), -1) for r in rows], dtype=np.int64)
        return idx, [int(i) for i in np.flatnonzero(idx < 0)]


# ----------------------------------------------------------------------------------------------------------------
# the selector


class Rho1Selector(TokenSelector):
    """Keep the top ``keep_fraction`` of the global batch's tokens by excess loss CE_target − CE_reference."""

    name = "rho1"

    def __init__(self, reference: nn.Module, keep_fraction: float = 0.6, cache: ReferenceLossCache | None = None):
        check_fraction(keep_fraction, "rho1.keep_fraction")
        self.reference = freeze(reference)
        self.keep_fraction = float(keep_fraction)
        self.cache = cache
        self._kept = 0
        self._total = 0
        self._last_kept_fraction = float("nan")
        self._cache_hits = 0
        self._cache_misses = 0

    def setup(self, model: nn.Module, device: torch.device) -> None:
        self.reference.to(device)
        freeze(self.reference)

    def reference_ce(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            return reference_token_ce(self.reference, input_ids)
        idx, missing = self.cache.lookup(input_ids)
        out = torch.empty(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.float32)
        hit = np.flatnonzero(idx >= 0)
        if len(hit):
            # fancy indexing a memmap needs sorted unique rows to be cheap; the batch is small, so plain gather
            out[torch.from_numpy(hit)] = torch.from_numpy(np.asarray(self.cache.losses[idx[hit]], dtype=np.float32))
        if missing:
            out[missing] = reference_token_ce(self.reference, input_ids[missing]).float().cpu()
        self._cache_hits += len(hit)
        self._cache_misses += len(missing)
        return out.to(input_ids.device)

    def token_scores(self, input_ids: torch.Tensor, token_ce: torch.Tensor) -> torch.Tensor:
        """Excess loss CE_target − CE_reference [B, L-1] of one micro-batch."""
        return token_ce.detach().float() - self.reference_ce(input_ids).to(token_ce.device)

    def on_mask(self, mask: torch.Tensor) -> None:
        k, n = int(mask.sum()), mask.numel()
        self._kept += k
        self._total += n
        self._last_kept_fraction = k / max(n, 1)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kept_fraction": self._last_kept_fraction,
                               "kept_fraction_total": self._kept / max(self._total, 1)}
        if self.cache is not None:
            out["ref_cache_hits"] = self._cache_hits
            out["ref_cache_misses"] = self._cache_misses
        return out

    def state_dict(self) -> dict[str, Any]:
        # the reference is static and lives in its own checkpoint directory; only the counters are state
        return {"kept": self._kept, "total": self._total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._kept = int(state.get("kept", 0))
        self._total = int(state.get("total", 0))


# ----------------------------------------------------------------------------------------------------------------
# the pipeline method


@register
class Rho1(SelectionMethod):
    """RHO-1 in the multi-round runner (METHODS §3): a reference trained once per method seed from the warm-up
    target on ``rho1.files`` (default: the selection set's text, never a report set), frozen; every round the whole
    shard is fed and the loss keeps the top ``keep_fraction`` of tokens by excess loss."""

    name = "rho1"
    description = "token-level: keep the top tokens by excess loss against a static reference model"
    config_cls = Rho1Config
    level = "token"
    needs = frozenset({"selection_set"})
    stages = ("selection", "target", "eval")
    seed_stages = ("reference",)
    color = "#2ca02c"

    def data_files(self) -> list[str]:
        return list(self.cfg.files)

    def token_selector(self, ctx: RoundContext) -> TokenSelector:
        # The reference starts where the target started (the warm-up checkpoint).
        ref_dir = ctx.seed_dir / "reference"
        init = load_checkpoint_model(ctx.run.layout.warmup("target"), device=ctx.device)
        cfg = replace(self.cfg, seed=ctx.derived_seed(STREAM_REFERENCE, per_round=False))
        # single-process code: rank 0 trains and saves it, the other ranks then load the saved reference
        ref = ctx.run.main_first(lambda: train_reference(cfg, init, ctx.selection_set, ctx.pool.load_tokenizer(),
                                                         ref_dir, device=ctx.device))
        return Rho1Selector(ref, self.cfg.keep_fraction)

    def selection_flops(self, f: FlopContext) -> float:
        nt, c = f.params(f.recipe.target.preset), self.cfg
        # one reference forward per trained token, plus the reference's own training (amortised over rounds)
        return float(f.target_tokens_per_round * 2 * nt + c.steps * c.batch_size * f.seq_len * 6 * nt / f.recipe.rounds)

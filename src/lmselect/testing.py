"""Small real building blocks for tests and examples: an in-memory byte-level BPE and a tiny packed pool.

Used by lmselect's own test suite and handy for users' tests of code built on lmselect (no network, seconds on CPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmselect.data.pool import write_pool

SAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the tokens before it.",
    "Selecting good pretraining data lowers the validation loss of the model.",
    "Buy cheap pills now!!! Click here for a free offer, limited time only.",
    "The committee met on Tuesday to discuss the budget for the coming year.",
    "Rain is expected in the north, with sunshine in the south later today.",
    "She opened the door and saw the garden covered in snow.",
    "Subscribe to our mailing list to win a prize of one million dollars.",
] * 8


def make_tokenizer(vocab_size: int = 320):
    """A byte-level BPE trained in memory on a few sentences, wrapped as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SAMPLE_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_pool(path: Path, tokenizer, n_per_shard: int = 16, n_shards: int = 2, n_val: int = 8, seq_len: int = 32, seed: int = 0) -> Path:
    """A pool of real tokenized sentences, two sources ('clean', 'spam'), shards 0..n_shards-1 plus a val hold-out."""
    rng = np.random.default_rng(seed)
    clean = [t for t in SAMPLE_TEXT if "!!!" not in t and "prize" not in t]
    spam = [t for t in SAMPLE_TEXT if "!!!" in t or "prize" in t]
    n = n_per_shard * n_shards + n_val
    rows, sources = [], []
    eos = tokenizer.eos_token_id
    for _i in range(n):
        src = "spam" if rng.random() < 0.3 else "clean"
        pool_txt = spam if src == "spam" else clean
        ids: list[int] = []
        while len(ids) < seq_len:
            ids += tokenizer.encode(pool_txt[rng.integers(len(pool_txt))]) + [eos]
        rows.append(ids[:seq_len])
        sources.append(src)
    shard = np.concatenate([np.repeat(np.arange(n_shards), n_per_shard), np.full(n_val, -1)]).astype(np.int32)
    return write_pool(path, np.array(rows), shard, sources, tokenizer, seed=seed, config={"test": True})


SAMPLE_LAMBADA = [
    "The quick brown fox jumps over the lazy dog",
    "A language model predicts the next token from the tokens before it",
    "She opened the door and saw the garden covered in snow",
    "The committee met on Tuesday to discuss the budget for the coming year",
    "Rain is expected in the north, with sunshine in the south later today",
    "Selecting good pretraining data lowers the validation loss of the model",
]


def write_jsonl_texts(path: Path, texts: list[str]) -> Path:
    """One ``{"text": ...}`` record per line."""
    import json

    Path(path).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return Path(path)


def make_valset(path: Path, tokenizer, texts: list[str] | None = None, kind: str = "lambada", seq_len: int = 32):
    """Write ``texts`` (default: six LAMBADA-style passages) to ``path`` and load them as a ValidationSet."""
    from lmselect.data.valset import load_validation  # torch: the other helpers need none

    return load_validation(write_jsonl_texts(path, texts or SAMPLE_LAMBADA), tokenizer, kind=kind, seq_len=seq_len)


# Report texts for tiny recipes: disjoint from SAMPLE_LAMBADA (the selection set), as a recipe requires.
REPORT_LAMBADA = [
    "The old bridge over the river was closed for repairs all winter",
    "He packed his bag, locked the house and walked to the station",
    "The children built a castle of sand and waited for the tide",
    "Every morning the baker lit the oven before the sun was up",
    "The library keeps its rarest maps in a cool and quiet room",
    "After the storm the fishermen mended their nets on the beach",
]
REPORT_CLEAN = [
    "The museum opened a new wing for modern sculpture last spring.",
    "Farmers in the valley grow apples, pears and a little wheat.",
    "A small orchestra played in the park on Sunday afternoon.",
    "The council voted to repair the roads before the winter.",
    "Bees carry pollen from flower to flower across the meadow.",
    "The ship left the harbour at dawn with a cargo of timber.",
]

TINY_RECIPE = """
name: tiny
seed: 0
pool: {{path: {pool}}}
validation: {{selection: {selection}, lambada: {lambada}, clean: {clean}, max_items: 8, seq_len: 32, batch_size: 8}}
target: {{preset: debug}}
proxy: {{preset: debug}}
warmup: {{fraction: 0.5, steps: 3}}
rounds: 2
select_fraction: 0.25
round_steps: 2
methods: [random, bliss]
seeds: [0]
train: {{global_batch: 4, micro_batch: 2, log_every: 1, optim: {{lr: 1.0e-3, warmup_steps: 1}}}}
decay: {{steps: 2, halve_every: 1}}
eval: {{downstream: false}}
bliss: {{outer_steps: 2, batch_size: 4, val_batch_size: 4, log_every: 1, save_every: 1, proxy_lr: 1.0e-4, score_lr: 1.0e-3}}
mates: {{n_probe: 6, influence_steps: 3, influence_batch_size: 2, influence_eval_every: 1, val_items: 4, val_batch_size: 4, probe_chunk: 3}}
rho1: {{steps: 2, batch_size: 2, seq_len: 32}}
blade: {{tau: 2, ref_steps: 1, ref_batch_size: 2}}
perplexity: {{band: low, batch_size: 8}}
reference: {{steps: 2, batch_size: 2, seq_len: 32}}
fasttext: {{dim: 16, bucket: 10000, epoch: 20}}
score_batch_size: 8
"""


def make_tiny_recipe(d: Path) -> Path:
    """A complete 2-round recipe on a tiny pool (debug presets, a few steps per stage): ``d/tiny.yaml``."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    pool = make_pool(d / "pool", tok, n_per_shard=12, n_shards=3, n_val=4, seq_len=32)
    sel = write_jsonl_texts(d / "selection.jsonl", SAMPLE_LAMBADA)
    lam = write_jsonl_texts(d / "report_lambada.jsonl", REPORT_LAMBADA)
    clean = write_jsonl_texts(d / "report_clean.jsonl", REPORT_CLEAN)
    p = d / "tiny.yaml"
    p.write_text(TINY_RECIPE.format(pool=pool, selection=sel, lambada=lam, clean=clean))
    return p

"""Build the tiny random HF model fixtures under tests/fixtures/.

Run by hand from the repository root (CPU only, ~1 minute):

    python3 scripts/reference/make_fixtures.py

Needs torch, transformers (5.x), tokenizers, safetensors. No network: the
tokenizer is trained here on the text below and the models are random.
Output is deterministic (fixed seeds, single-threaded tokenizer training), so
re-running should leave `git diff` empty.

Each fixture directory gets config.json, model.safetensors, tokenizer.json and
expected.json (the PyTorch reference the Rust side is tested against; see
refcommon.py for the exact definitions of losses and norms).
"""

from __future__ import annotations

import os

# Rayon (inside `tokenizers`) merges word counts from several threads; pin it
# to one so BPE tie-breaking cannot depend on scheduling.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM,
                          LlamaConfig, LlamaForCausalLM)

import refcommon as rc

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
EOT = "<|endoftext|>"
VOCAB_SIZE = 320

# Tokenizer training text. Plain English with names, dates and some accented
# letters so the learned merges look like a real (if tiny) BPE vocabulary.
CORPUS = [
    "The town of Ashford sits where the river bends toward the sea. Every autumn "
    "the people of the town hold a fair, and the farmers bring their best animals, "
    "their bread and their cheese. The children run between the stalls while the "
    "older men talk about the weather and the price of wheat.",
    "In the winter of 1887 a young weaver named Clara Whitfield opened a small shop "
    "near the market. She worked from morning until evening, and her cloth was said "
    "to be the finest in the whole county. When the railway came, she sent her work "
    "to the city and became known far beyond the village.",
    "The ship left the harbour at dawn and sailed north for many days. The captain "
    "wrote in his diary that the water was calm, that the men were in good spirits, "
    "and that the ice had not yet closed behind them. On the tenth day they saw the "
    "first island, white and silent under a grey sky.",
    "Zoë Müller studied the history of Zürich and wrote about the old bridges over "
    "the river. Her friend Tomas Brennan kept the lighthouse on the northern coast, "
    "and every evening he lit the lamp and wrote a few lines in his notebook about "
    "the ships that passed in the night.",
    "After years of quiet work in a cold laboratory, Dr. Mira Kovac published her "
    "results on the second of February. The newspapers printed her name on the "
    "front page, the university gave a dinner in her honour, and the town "
    "celebrated with music in the square until late at night.",
]

# Shared by llama and gpt2 fixtures: short enough for 64 positions, >= 20
# tokens each. Text 1 has non-ASCII letters *before* its spans so that byte
# offsets and char offsets disagree: spans are code-point offsets.
SHORT_TEXTS = [
    ("On 3 May 2021, Ada Lovelace opened a museum.",
     ["3 May 2021", "Ada Lovelace"]),
    ("Zoë Müller met the mayor on 14 July 1998.",
     ["Zoë Müller", "14 July 1998"]),
    ("The old keeper, Tomas Brennan, wrote every night.",
     ["Tomas Brennan"]),
]

# GPT-Neo's local layer only sees the last 8 positions, so these put the spans
# well past the window from the start of the text.
LONG_TEXTS = [
    ("The village held a fair each autumn; in 1887 the weaver Clara Whitfield won.",
     ["1887", "Clara Whitfield"]),
    ("The ship sailed north for days, and on 9 June 1850 Elias Hart saw the ice.",
     ["9 June 1850", "Elias Hart"]),
    ("After years of quiet work in the cold, the chemist Mira Kovac published.",
     ["Mira Kovac"]),
]


def train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False: token offsets keep the leading space of "Ġword", which
    # is what the span-overlap rule in refcommon.span_targets is defined on.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def char_spans(text: str, needles: list[str]) -> list[list[int]]:
    """Python str indices are code points, which is the unit we promise."""
    out = []
    for s in needles:
        i = text.index(s)
        out.append([i, i + len(s)])
    return out


def reinit_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with large-ish random values.

    HF's own init uses std 0.02, zero biases and unit norms, which leaves bias
    and norm gradients trivially structured and gradients tiny. Here: weights
    N(0, 0.1), embeddings N(0, 0.2), biases N(0, 0.1), norm gains 1 + N(0, 0.1).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            is_norm = any(k in name for k in ("norm", "ln_"))
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed" in name or name.split(".")[-2] in ("wte", "wpe"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.1 * noise)


def llama_config(vocab: int, **kw) -> LlamaConfig:
    base = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=100000.0, rms_norm_eps=1e-5, hidden_act="silu",
        attention_dropout=0.0, bos_token_id=0, eos_token_id=0, initializer_range=0.1,
    )
    base.update(kw)
    return LlamaConfig(**base)


def gpt2_config(vocab: int) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64,
        activation_function="gelu_new", layer_norm_epsilon=1e-5,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
        bos_token_id=0, eos_token_id=0, initializer_range=0.1,
    )


def gpt_neo_config(vocab: int) -> GPTNeoConfig:
    return GPTNeoConfig(
        vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        max_position_embeddings=64, attention_types=[[["global", "local"], 1]], window_size=8,
        activation_function="gelu_new", layer_norm_epsilon=1e-5,
        embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0,
        summary_first_dropout=0.0, bos_token_id=0, eos_token_id=0, initializer_range=0.1,
    )


FIXTURE_SPECS = [
    # name, model class, config factory, seed, saved dtype, texts
    ("llama", LlamaForCausalLM,
     lambda v: llama_config(v, tie_word_embeddings=True, attention_bias=True),
     1001, torch.float32, SHORT_TEXTS),
    ("llama_untied_bf16", LlamaForCausalLM,
     lambda v: llama_config(v, num_hidden_layers=3, tie_word_embeddings=False, attention_bias=False),
     1002, torch.bfloat16, SHORT_TEXTS),
    ("gpt2", GPT2LMHeadModel, gpt2_config, 1003, torch.float32, SHORT_TEXTS),
    ("gpt2_f16", GPT2LMHeadModel, gpt2_config, 1004, torch.float16, SHORT_TEXTS),
    ("gpt_neo", GPTNeoForCausalLM, gpt_neo_config, 1005, torch.float32, LONG_TEXTS),
]


def build_fixture(name, cls, make_config, seed, dtype, texts, tok: Tokenizer) -> None:
    out = FIXTURES / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    vocab = tok.get_vocab_size()
    torch.manual_seed(seed)
    config = make_config(vocab)
    model = cls(config).eval()
    reinit_(model, seed)
    model.to(dtype)
    model.save_pretrained(out)  # transformers 5 always writes safetensors
    # save_pretrained also drops a generation_config.json we do not ship.
    (out / "generation_config.json").unlink(missing_ok=True)
    tok.save(str(out / "tokenizer.json"))

    # The reference is computed from what is on disk, reloaded, so a half
    # precision fixture is checked against its rounded weights upcast to f32.
    model = cls.from_pretrained(out, attn_implementation="eager").float().eval()
    for p in model.parameters():
        p.requires_grad_(True)

    entries, all_ids, all_targets, all_logits, results = [], [], [], [], []
    for text, needles in texts:
        spans = char_spans(text, needles)
        enc = tok.encode(text, add_special_tokens=False)
        ids = enc.ids
        if not (20 <= len(ids) <= config.max_position_embeddings):
            raise SystemExit(f"{name}: text has {len(ids)} tokens: {text!r}")
        if cls is GPTNeoForCausalLM and len(ids) < 30:
            raise SystemExit(f"{name}: gpt-neo text too short ({len(ids)} tokens)")
        targets = rc.span_targets(enc.offsets, spans)
        res = rc.measure_text(model, ids, targets, want_logits=True)
        entries.append({"text": text, "spans": spans})
        all_ids.append(ids)
        all_targets.append(targets)
        all_logits.append([[rc.r8(x) for x in row] for row in res["logits"].tolist()])
        results.append(res)

    summary = rc.summarize(results)
    expected = {
        "texts": entries,
        "token_ids": all_ids,
        "span_targets": all_targets,
        "logits": all_logits,
        "span_loss": [rc.r8(r["span_loss"]) for r in results],
        "full_loss": [rc.r8(r["full_loss"]) for r in results],
        "per_text": summary["per_text"],
        "groups": summary["groups"],
        "param_grad_norms": rc.param_grad_norm_means(results),
    }
    rc.dump_json(expected, out / "expected.json")

    size = sum(f.stat().st_size for f in out.iterdir())
    rel = ", ".join(f"L{g['layer']}.{g['module']}={g['relative']:.4g}" for g in summary["groups"])
    print(f"{name:18s} {size / 1024:7.1f} KiB  tokens={[len(i) for i in all_ids]}  relative: {rel}")


def main() -> None:
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    print(f"tokenizer vocab: {tok.get_vocab_size()}")
    for spec in FIXTURE_SPECS:
        build_fixture(*spec, tok=tok)


if __name__ == "__main__":
    main()

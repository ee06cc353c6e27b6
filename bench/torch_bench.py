#!/usr/bin/env python3
"""PyTorch reference for `hypersphere bench`: the same workloads, the same JSON shape.

    python bench/torch_bench.py --model DIR --threads 2 --steps 5 --inputs DIR --out FILE.json

Workloads: a 2048^3 f32 matmul, 64x32 training steps on random ids, one training step per
batch of INPUTS/mix_batches.json, and SentenceTransformer.encode over INPUTS/sentences.txt.

On a GPU (issue 14): `--device cuda --dtype bf16` trains under bf16 autocast (f32 weights and
Adam state), `--shapes 128x32,512x32,1024x64` adds fixed-shape steps at those pairs x tokens
(`train_shapes` in the JSON), and every timing waits for the device to finish.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

# Never reach for the hub: everything loads from the local model folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model folder (config.json, model.safetensors, ...)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps of train_fixed")
    p.add_argument("--pooling", choices=["cls", "mean"], default="cls",
                   help="training embedding: the [CLS] vector (hypersphere's default config) or the masked mean")
    p.add_argument("--inputs", required=True, help="folder with mix_batches.json and sentences.txt")
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                   help="f32, or bf16 autocast (f32 master weights and optimizer state)")
    p.add_argument("--shapes", default="", help="extra fixed-shape steps, PAIRSxTOKENS,... (e.g. 128x32,512x32)")
    return p.parse_args()


ARGS = parse_args()
# The fast tokenizer inside SentenceTransformer has its own rayon pool; keep it to the budget.
os.environ.setdefault("RAYON_RS_NUM_CPUS", str(ARGS.threads))

import torch  # noqa: E402  (imported after the environment is set)
import transformers  # noqa: E402
import sentence_transformers  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from transformers import AutoModel  # noqa: E402

# The "Loading weights" bar would clutter the progress lines compare.py streams through.
transformers.utils.logging.disable_progress_bar()


def sync():
    """Wait for queued device work, so a timer measures it (a no-op on the CPU)."""
    if ARGS.device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast():
    return torch.autocast(device_type=ARGS.device.split(":")[0], dtype=torch.bfloat16,
                          enabled=ARGS.dtype == "bf16")


def log(msg):
    print(f"[torch_bench] {msg}", file=sys.stderr, flush=True)


def load_config(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


def forward_flop(cfg, rows, seq):
    """Matmul FLOPs of one encoder forward on a [rows, seq] padded batch."""
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    tokens = rows * seq
    dense = 2 * tokens * (4 * h * h + 2 * h * i)  # q, k, v, out projections + the two FFN matmuls
    attn = 4 * rows * seq * seq * h  # q kᵀ and probs @ v
    return layers * (dense + attn)


def train_flop(cfg, rows, seq):
    # Backward costs about twice the forward.
    return 3 * forward_flop(cfg, rows, seq)


# ---- loss: Wang & Isola alignment + uniformity, written as in src/loss.rs -----------------

def align(x, y):
    return (x - y).pow(2).sum(1).mean()


def uniform(z, t=2.0):
    n = z.shape[0]
    sq = (2.0 - 2.0 * z @ z.T).clamp(min=0.0)
    # Multiply by an off-diagonal mask (as the Rust side does) so self-pairs add nothing.
    off = 1.0 - torch.eye(n, dtype=z.dtype, device=z.device)
    return ((torch.exp(-t * sq) * off).sum() / (n * (n - 1))).log()


def loss_fn(emb):
    n = emb.shape[0] // 2
    x, y = emb[:n], emb[n:]
    return align(x, y) + (uniform(x) + uniform(y)) / 2.0


# ---- training ---------------------------------------------------------------------------

def make_optimizer(model):
    # Weight decay only on matrices; biases and LayerNorm parameters are left alone.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    # Default implementation: for CPU tensors torch picks the per-tensor loop (neither foreach
    # nor fused is the default off-GPU), which is what a plain training script gets.
    return torch.optim.AdamW(groups, lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def train_step(model, opt, input_ids, attention_mask):
    """One step; returns (forward_s, backward_s, optimizer_s)."""
    input_ids, attention_mask = input_ids.to(ARGS.device), attention_mask.to(ARGS.device)
    token_type_ids = torch.zeros_like(input_ids)

    sync()
    t0 = time.perf_counter()
    with autocast():
        out = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        states = out.last_hidden_state
    # Pooling, normalisation and the loss in f32, as hypersphere's mixed precision does.
    states = states.float()
    if ARGS.pooling == "cls":
        pooled = states[:, 0]
    else:
        m = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * m).sum(1) / m.sum(1)
    emb = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
    loss = loss_fn(emb)
    loss.item()  # forces the forward to finish (and is what a trainer logs)
    t1 = time.perf_counter()
    loss.backward()
    # The gradient-norm pass is counted with backward, as on the Rust side.
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    sync()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def fixed_batch(vocab, pairs, seq):
    rows = 2 * pairs
    ids = torch.randint(1000, vocab, (rows, seq), dtype=torch.long, device=ARGS.device)
    ids[:, 0] = 101  # [CLS]
    ids[:, -1] = 102  # [SEP]
    mask = torch.ones(rows, seq, dtype=torch.long, device=ARGS.device)
    return ids, mask


def bench_train_fixed(model, opt, cfg, steps, pairs=64, seq=32):
    ids, mask = fixed_batch(cfg["vocab_size"], pairs, seq)
    log(f"train_fixed: warm-up step ({2 * pairs}x{seq})")
    train_step(model, opt, ids, mask)
    fwd, bwd, optim, total = [], [], [], []
    for k in range(steps):
        f, b, o = train_step(model, opt, ids, mask)
        fwd.append(f)
        bwd.append(b)
        optim.append(o)
        total.append(f + b + o)
        log(f"train_fixed: step {k + 1}/{steps}: forward {f:.3f}s backward {b:.3f}s optimizer {o:.3f}s")
    step_s = statistics.median(total)
    gflop = train_flop(cfg, 2 * pairs, seq) / 1e9
    return {
        "pairs": pairs,
        "seq": seq,
        "steps": steps,
        "forward_s": statistics.median(fwd),
        "backward_s": statistics.median(bwd),
        "optimizer_s": statistics.median(optim),
        "step_s": step_s,
        "pairs_per_s": pairs / step_s,
        "gflop_per_step": gflop,
        "achieved_gflops": gflop / step_s,
    }


def bench_train_mix(model, opt, cfg, path):
    with open(path) as f:
        batches = json.load(f)["batches"]
    if not batches:
        raise SystemExit(f"{path}: no batches")
    tensors = []
    for b in batches:
        ids = torch.tensor(b["input_ids"], dtype=torch.long)
        mask = torch.tensor(b["attention_mask"], dtype=torch.long)
        if ids.shape != mask.shape or ids.shape[0] % 2:
            raise SystemExit(f"{path}: bad batch shape {tuple(ids.shape)} / {tuple(mask.shape)}")
        tensors.append((ids, mask))

    log(f"train_mix: warm-up step on batch 0 {tuple(tensors[0][0].shape)}")
    train_step(model, opt, *tensors[0])
    fwd = bwd = optim = 0.0
    pairs = tokens = 0
    seqs, flop = [], 0
    for k, (ids, mask) in enumerate(tensors):
        f, b, o = train_step(model, opt, ids, mask)
        fwd, bwd, optim = fwd + f, bwd + b, optim + o
        rows, seq = ids.shape
        pairs += rows // 2
        tokens += int(mask.sum())
        seqs.append(seq)
        flop += train_flop(cfg, rows, seq)
        log(f"train_mix: batch {k + 1}/{len(tensors)} {rows}x{seq}: {f + b + o:.3f}s")
    seconds = fwd + bwd + optim
    gflop = flop / 1e9
    return {
        "batches": len(tensors),
        "pairs": pairs,
        "tokens": tokens,
        "mean_seq": sum(seqs) / len(seqs),
        "forward_s": fwd,
        "backward_s": bwd,
        "optimizer_s": optim,
        "seconds": seconds,
        "pairs_per_s": pairs / seconds,
        "gflop": gflop,
        "achieved_gflops": gflop / seconds,
    }


# ---- inference and raw matmul -----------------------------------------------------------

def bench_embed(model_dir, path, batch_size=64, max_len=128):
    with open(path) as f:
        sentences = [line.rstrip("\n") for line in f if line.strip()]
    model = SentenceTransformer(model_dir, device=ARGS.device)
    # Whatever dtype the checkpoint holds: f32, or bf16 weights for --dtype bf16.
    model = model.to(torch.bfloat16) if ARGS.dtype == "bf16" else model.float()
    model.max_seq_length = max_len
    log(f"embed: warm-up on {min(256, len(sentences))} sentences")
    model.encode(sentences[:256], batch_size=batch_size, convert_to_numpy=True,
                 normalize_embeddings=False, show_progress_bar=False)
    log(f"embed: {len(sentences)} sentences")
    t0 = time.perf_counter()
    model.encode(sentences, batch_size=batch_size, convert_to_numpy=True,
                 normalize_embeddings=False, show_progress_bar=False)
    sync()
    seconds = time.perf_counter() - t0
    return {
        "sentences": len(sentences),
        "batch_size": batch_size,
        "max_len": max_len,
        "seconds": seconds,
        "sentences_per_s": len(sentences) / seconds,
    }


def bench_gemm(n=2048, reps=5):
    a = torch.randn(n, n, dtype=torch.float32, device=ARGS.device)
    b = torch.randn(n, n, dtype=torch.float32, device=ARGS.device)
    torch.matmul(a, b)  # warm-up
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"n": n, "gflops": 2 * n**3 / t / 1e9}


def main():
    args = ARGS
    torch.set_num_threads(args.threads)
    torch.manual_seed(42)
    cfg = load_config(args.model)

    result = {
        "impl": "pytorch",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__,
        },
        "model": args.model,
        "threads": args.threads,
        "pooling": args.pooling,
        "device": args.device,
        "dtype": args.dtype,
    }

    log("gemm")
    result["gemm"] = bench_gemm()

    model = AutoModel.from_pretrained(args.model, attn_implementation="sdpa", dtype=torch.float32).to(args.device)
    model.train()  # dropout 0.1 on, as in the Rust trainer
    opt = make_optimizer(model)
    result["train_fixed"] = bench_train_fixed(model, opt, cfg, args.steps)
    result["train_shapes"] = [
        bench_train_fixed(model, opt, cfg, args.steps, pairs=int(p), seq=int(t))
        for p, t in (shape.split("x") for shape in args.shapes.split(",") if shape)
    ]
    result["train_mix"] = bench_train_mix(model, opt, cfg, os.path.join(args.inputs, "mix_batches.json"))
    # Free the training model, its gradients and Adam state before loading the encoder.
    del model, opt

    result["embed"] = bench_embed(args.model, os.path.join(args.inputs, "sentences.txt"))
    # ru_maxrss is in KiB on Linux.
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device.startswith("cuda"):
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20

    text = json.dumps(result, indent=2)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()

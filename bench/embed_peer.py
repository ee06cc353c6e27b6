#!/usr/bin/env python3
"""One peer mode of `embed`, timed: ONNX Runtime fp32 or int8, PyTorch f32 or bf16.

    python bench/embed_peer.py --mode ort-int8 --model DIR --sentences FILE --threads 2 --out OUT.json
        [--work DIR] [--stsb sts-test.csv]

bench/embed_speed.py runs every mode, ours included, alternately; this script is one of them.
PyTorch runs sentence-transformers' `encode` (bf16: the model's weights cast to bf16, faster
than autocast on the CPU).
The model (a Hugging Face BERT folder) is exported with `torch.onnx.export` (token states out;
mean pooling and L2 normalisation in numpy, as sentence-transformers' pipeline does), then
quantized with `onnxruntime.quantization.quantize_dynamic`: per-channel QInt8 weights and
dynamic QUInt8 activations, the settings of sentence-transformers' `avx512_vnni` config.
Batches of 64 sentences sorted by token count (as `hypersphere embed` does), padded to the
longest in the batch, at most --max-len tokens. The mode is timed after a warm-up on 256
sentences; the embeddings are saved beside OUT as .npy (for the cosine to f32), and with
--stsb the STS-B test Spearman x 100 of the same embedder is added.
"""
import argparse
import json
import os
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--sentences", required=True, help="one sentence per line")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mode", required=True, choices=["ort-fp32", "ort-int8", "torch-f32", "torch-bf16"])
    p.add_argument("--stsb", default=None, help="STS-B sts-test.csv: add its Spearman x 100")
    p.add_argument("--work", default=None, help="folder for the exported models (default: beside --out)")
    p.add_argument("--out", required=True)
    return p.parse_args()


ARGS = parse_args()
os.environ.setdefault("RAYON_RS_NUM_CPUS", str(ARGS.threads))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402


def log(msg):
    print(f"[ort_bench] {msg}", file=sys.stderr, flush=True)


def export(model_dir, work):
    """fp32 and int8 ONNX files in `work` (made once, reused when present)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    os.makedirs(work, exist_ok=True)
    fp32, int8 = os.path.join(work, "model.onnx"), os.path.join(work, "model-int8.onnx")
    if not os.path.exists(fp32):
        log(f"exporting {model_dir} to {fp32}")
        model = AutoModel.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()

        class States(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.m(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

        ids = torch.ones(2, 8, dtype=torch.int64)
        axes = {0: "batch", 1: "seq"}
        torch.onnx.export(States(model), (ids, ids, torch.zeros_like(ids)), fp32,
                          input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["states"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                                        "states": {0: "batch", 1: "seq"}})
    if not os.path.exists(int8):
        log(f"quantizing to {int8}")
        quantize_dynamic(fp32, int8, per_channel=True, reduce_range=False, weight_type=QuantType.QInt8)
    return {"ort-fp32": fp32, "ort-int8": int8}


def batches(tokenizer, sentences):
    """Batches of token ids sorted by length, with each batch's row indices."""
    lengths = [len(x) for x in tokenizer(sentences, truncation=True, max_length=ARGS.max_len)["input_ids"]]
    order = sorted(range(len(sentences)), key=lambda i: lengths[i])
    out = []
    for s in range(0, len(order), ARGS.batch_size):
        idx = order[s:s + ARGS.batch_size]
        enc = tokenizer([sentences[i] for i in idx], padding=True, truncation=True,
                        max_length=ARGS.max_len, return_tensors="np")
        out.append((idx, {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}))
    return out


def embed(session, tokenizer, sentences):
    """Unit-norm mean-pooled embeddings in input order; tokenization is timed too."""
    rows = np.zeros((len(sentences), 0), dtype=np.float32)
    for idx, feed in batches(tokenizer, sentences):
        states = session.run(["states"], feed)[0]
        mask = feed["attention_mask"][:, :, None].astype(np.float32)
        pooled = (states * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        if rows.shape[1] == 0:
            rows = np.zeros((len(sentences), pooled.shape[1]), dtype=np.float32)
        rows[idx] = pooled
    return rows


def embedder():
    """A function from sentences to unit-norm rows in input order, for --mode."""
    if ARGS.mode.startswith("ort-"):
        work = ARGS.work or os.path.join(os.path.dirname(os.path.abspath(ARGS.out)), "onnx")
        path = export(ARGS.model, work)[ARGS.mode]
        tokenizer = AutoTokenizer.from_pretrained(ARGS.model)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = ARGS.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        return lambda texts: embed(session, tokenizer, texts)
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(ARGS.threads)
    model = SentenceTransformer(ARGS.model, device="cpu")
    model = model.to(torch.bfloat16) if ARGS.mode == "torch-bf16" else model.float()
    model.max_seq_length = ARGS.max_len
    return lambda texts: model.encode(texts, batch_size=ARGS.batch_size, convert_to_numpy=True,
                                      normalize_embeddings=True, show_progress_bar=False).astype(np.float32)


def stsb_spearman(encode, path):
    """STS-B Spearman x 100 of the cosine (the first 7 tab-separated fields of each row)."""
    a, b, gold = [], [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 7:
                gold.append(float(parts[4]))
                a.append(parts[5])
                b.append(parts[6])
    cos = (encode(a) * encode(b)).sum(1)

    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # ties share their mean rank
            tied = x == v
            r[tied] = r[tied].mean()
        return r

    return 100 * float(np.corrcoef(ranks(np.array(gold)), ranks(cos))[0, 1])


def main():
    with open(ARGS.sentences) as f:
        sentences = [line.rstrip("\n") for line in f if line.strip()]
    encode = embedder()
    result = {"mode": ARGS.mode, "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__},
              "threads": ARGS.threads, "max_len": ARGS.max_len, "batch_size": ARGS.batch_size,
              "sentences": len(sentences)}
    encode(sentences[:256])  # warm-up
    t0 = time.perf_counter()
    rows = encode(sentences)
    seconds = time.perf_counter() - t0
    np.save(os.path.splitext(ARGS.out)[0] + ".npy", rows)
    result.update({"seconds": seconds, "sentences_per_s": len(sentences) / seconds})
    log(f"{ARGS.mode}: {len(sentences) / seconds:.1f} sentences/s")
    if ARGS.stsb:
        result["stsb_test"] = stsb_spearman(encode, ARGS.stsb)
    text = json.dumps(result, indent=2)
    print(text)
    with open(ARGS.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()

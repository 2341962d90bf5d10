#!/usr/bin/env python3
"""Real-size model pairs for `scripts/bench-real.sh`, exported to ONNX at their real input
sizes (224×224 images; 128-token sequences).

For each requested architecture, two models that differ only in their random seed (model A:
seed 0, model B: seed 1), untrained, with a 10-class head:

- ``resnet18``, ``resnet50``: torchvision, default initialisation. Their BatchNorm running
  statistics are then recomputed on a few batches of random images (train mode, momentum
  None, i.e. a cumulative average, under ``torch.no_grad``), so that eval-mode activations
  are O(1) rather than the init's mean 0 / variance 1 that ignores the actual inputs. The
  exporter folds the BatchNorms into the convolutions.
- ``vit_b16``: timm ``vit_base_patch16_224``, default initialisation, except that the
  LayerNorm weights and biases and the Linear biases get a little noise (1 + 0.1·N(0, 1) and
  0.02·N(0, 1)): at init they are all ones or all zeros, and the exporter deduplicates equal
  initializers into one tensor fed to every layer through Identity nodes, which ties every
  block's units together (mudsc then finds no free group at all). Trained models never have
  equal biases. Attention is exported unfused (``q @ kᵀ``, Softmax, ``@ v``) rather than
  through ``scaled_dot_product_attention``, the form mudsc's head discovery reads.
- ``bert_base``: transformers ``BertForSequenceClassification`` with ``BertConfig()``'s
  bert-base-uncased sizes (12 post-LN layers, d 768, 12 heads, MLP 3072, vocabulary 30,522),
  default initialisation, eager attention, the same noise on the LayerNorm parameters and
  Linear biases as the ViT (for the same reason). Inputs ``input_ids``, ``attention_mask``,
  ``token_type_ids`` (int64 [batch, 128]).

Each model is exported with ``torch.onnx.export(dynamo=False, opset_version=17)``, input
``input`` [batch, 3, 224, 224] (or BERT's three) with a dynamic batch axis, output ``logits``
[batch, 10]; it is checked with the ONNX checker and against ONNX Runtime on two inputs. Files are written as
``OUT_DIR/<arch>_a.onnx`` and ``<arch>_b.onnx``; existing ones are kept.

The calibration set ``OUT_DIR/calib.npz`` holds ``--samples`` standard-normal images under
the key ``input`` (float32, seed 2); an existing one is kept when it has that many samples
and rewritten otherwise. BERT's is ``OUT_DIR/bert_calib.npz``: ``--samples`` sequences of
random token ids (seed 2) between ``[CLS]`` and ``[SEP]``, of lengths uniform in 16–128, padded
with 0 and masked, token types 0.

PyTorch's thread count comes from $BENCH_THREADS (default 1).

Usage: make_real.py OUT_DIR [--models resnet18,resnet50,vit_b16,bert_base] [--samples 256]
Takes about 1 minute per ResNet pair, 2 minutes for the ViT pair and 20 s for the BERT pair
on 2 cores.
"""

import argparse
import os
import sys
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)
warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
# timm's shape asserts and `attn_mask is not None` checks, constant for a fixed 224×224 input.
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)

SIZE = 224
CLASSES = 10
KNOWN = ("resnet18", "resnet50", "vit_b16", "bert_base")
# BERT's sequence length, vocabulary and special tokens (bert-base-uncased's).
SEQ = 128
VOCAB = 30522
CLS, SEP = 101, 102
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SEEDS = {"a": 0, "b": 1}
CALIB_SEED = 2
# BatchNorm statistics: batches × images of random input, in train mode.
BN_BATCHES = 4
BN_BATCH_SIZE = 16


def build(arch: str, seed: int) -> torch.nn.Module:
    """A freshly initialised model of `arch`, from `seed`."""
    torch.manual_seed(seed)
    if arch in ("resnet18", "resnet50"):
        import torchvision

        return getattr(torchvision.models, arch)(weights=None, num_classes=CLASSES)
    if arch == "vit_b16":
        import timm
        import timm.layers

        # The plain attention path: explicit MatMul / Softmax rather than SDPA.
        timm.layers.set_fused_attn(False)
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=CLASSES)
    if arch == "bert_base":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(num_labels=CLASSES)
        # The plain attention path, as for the ViT.
        config._attn_implementation = "eager"
        return BertForSequenceClassification(config)
    raise ValueError(arch)


def tokens(samples: int, seed: int) -> dict:
    """`samples` random sequences as BERT's three inputs (see the module docstring)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, VOCAB, size=(samples, SEQ), dtype=np.int64)
    mask = np.zeros((samples, SEQ), dtype=np.int64)
    for i, n in enumerate(rng.integers(16, SEQ + 1, size=samples)):
        ids[i, 0], ids[i, n - 1], ids[i, n:] = CLS, SEP, 0
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def recompute_bn_stats(model: torch.nn.Module, seed: int) -> None:
    """Replaces every BatchNorm's running statistics by their cumulative average over a few
    random batches (train mode, momentum None)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    gen = torch.Generator().manual_seed(1000 + seed)
    model.train()
    with torch.no_grad():
        for _ in range(BN_BATCHES):
            model(torch.randn(BN_BATCH_SIZE, 3, SIZE, SIZE, generator=gen))
    model.eval()


def perturb_constant_params(model: torch.nn.Module) -> None:
    """Noise on the LayerNorm weights and biases and the Linear biases, which init leaves all
    equal (see the module docstring); drawn from the global generator, so from the seed."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                m.bias.add_(0.02 * torch.randn_like(m.bias))
            elif isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.add_(0.02 * torch.randn_like(m.bias))


def export(arch: str, suffix: str, path: str) -> None:
    """Builds, prepares, exports and checks one model; writes `path` atomically."""
    t0 = time.time()
    seed = SEEDS[suffix]
    model = build(arch, seed)
    recompute_bn_stats(model, seed)
    if arch in ("vit_b16", "bert_base"):
        perturb_constant_params(model)
    model.eval()
    if arch == "bert_base":
        feed = tokens(2, 99)
        names = list(TOKEN_INPUTS)
    else:
        feed = {"input": np.random.default_rng(99).standard_normal((2, 3, SIZE, SIZE), dtype=np.float32)}
        names = ["input"]
    x = tuple(torch.from_numpy(feed[n]) for n in names)
    tmp = path + ".tmp"
    with torch.no_grad():
        out = model(*x)
        ref = (out.logits if hasattr(out, "logits") else out).numpy()
        torch.onnx.export(
            model,
            x,
            tmp,
            dynamo=False,
            opset_version=17,
            input_names=names,
            output_names=["logits"],
            dynamic_axes={n: {0: "batch"} for n in names + ["logits"]},
        )
    onnx.checker.check_model(tmp, full_check=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    sess = ort.InferenceSession(tmp, so, providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, feed)
    diff = float(np.abs(out - ref).max())
    scale = float(np.abs(ref).max())
    if not diff <= 1e-3 * max(1.0, scale):
        raise SystemExit(f"{path}: ONNX Runtime differs from PyTorch by {diff:.2e} (logits up to {scale:.2e})")
    os.replace(tmp, path)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{os.path.basename(path)}: {params / 1e6:.1f} M parameters, "
        f"{os.path.getsize(path) / 2**20:.1f} MiB, logits up to {scale:.2f}, "
        f"ORT vs torch {diff:.1e}, {time.time() - t0:.0f} s",
        flush=True,
    )


def write_calib(path: str, samples: int) -> None:
    """`samples` standard-normal images under the key `input`, unless `path` already holds
    exactly that many."""
    if os.path.exists(path):
        with np.load(path) as z:
            if "input" in z and z["input"].shape == (samples, 3, SIZE, SIZE):
                return
    rng = np.random.default_rng(CALIB_SEED)
    data = rng.standard_normal((samples, 3, SIZE, SIZE), dtype=np.float32)
    tmp = path + ".tmp.npz"
    np.savez(tmp, input=data)
    os.replace(tmp, path)
    print(f"{os.path.basename(path)}: {samples} images, {os.path.getsize(path) / 2**20:.0f} MiB", flush=True)


def write_token_calib(path: str, samples: int) -> None:
    """`samples` random sequences (`tokens`), unless `path` already holds exactly that many."""
    if os.path.exists(path):
        with np.load(path) as z:
            if all(k in z and z[k].shape == (samples, SEQ) for k in TOKEN_INPUTS):
                return
    tmp = path + ".tmp.npz"
    np.savez(tmp, **tokens(samples, CALIB_SEED))
    os.replace(tmp, path)
    print(f"{os.path.basename(path)}: {samples} sequences of {SEQ} tokens", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--models", default="resnet18,resnet50,vit_b16,bert_base")
    p.add_argument("--samples", type=int, default=256)
    args = p.parse_args()
    if args.samples < 1:
        raise SystemExit("--samples must be at least 1")
    os.makedirs(args.out_dir, exist_ok=True)
    archs = [m for m in args.models.split(",") if m]
    unknown = [m for m in archs if m not in KNOWN]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)} (known: {', '.join(KNOWN)})")
    for arch in archs:
        for suffix in SEEDS:
            path = os.path.join(args.out_dir, f"{arch}_{suffix}.onnx")
            if not os.path.exists(path):
                export(arch, suffix, path)
    if any(a != "bert_base" for a in archs):
        write_calib(os.path.join(args.out_dir, "calib.npz"), args.samples)
    if "bert_base" in archs:
        write_token_calib(os.path.join(args.out_dir, "bert_calib.npz"), args.samples)


if __name__ == "__main__":
    sys.exit(main())

"""Model throughput: our BLIP against transformers' BLIP on the same weights and inputs, float32.

Measures captioning by nucleus sampling (1 and 5 samples per image) in images/s, beam search in images/s,
and ITM in pairs/s (one text per image, and the filter's two texts per image); prints them side by side with
the ratio and the achieved GFLOP/s against this machine's measured float32 matmul peak. Targets (CPU, float32):
captioning >= 1.5x transformers, ITM >= 1.1x.

Every sequence is forced to the same length (min_length = max_length) so both sides decode the same
number of tokens whatever their samples are.

    .venv/bin/python benchmarks/bench_model.py [--size base|small] [--images 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from blip_core import BlipModel, BlipTokenizer

SIZES = {
    # ViT-B/16 + BERT-base at 224 px: the paper's base model at pre-training resolution.
    "base": dict(
        vision=dict(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224
        ),
        text=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    ),
    "small": dict(
        vision=dict(
            hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536, image_size=224
        ),
        text=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536),
    ),
}


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def build_hf(size: str, kind: str):
    from transformers import BlipConfig as HFConfig
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    s = SIZES[size]
    cfg = HFConfig(
        vision_config=dict(patch_size=16, **s["vision"]),
        text_config=dict(vocab_size=30524, encoder_hidden_size=s["vision"]["hidden_size"], **s["text"]),
        image_text_hidden_size=256,
    )
    torch.manual_seed(0)
    cls = BlipForConditionalGeneration if kind == "caption" else BlipForImageTextRetrieval
    return cls(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="base")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--length", type=int, default=20, help="tokens per caption, [DEC] and prompt included")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = BlipTokenizer.bert_base_uncased()
    n, L = args.images, args.length
    images = torch.randn(n, 3, SIZES[args.size]["vision"]["image_size"], SIZES[args.size]["vision"]["image_size"])
    prompt_ids, _ = tok(["a picture of "], add_sep=False)
    prompt_ids[:, 0] = 30522
    peak = matmul_peak()
    rows = []

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        hf = build_hf(args.size, "caption")
        hf.save_pretrained(tmp)
        ours = BlipModel.from_pretrained(tmp)
        hf_ids = prompt_ids.expand(n, -1)
        for k in (1, 5):

            def run_ours(k=k):
                return ours.generate_ids(
                    images,
                    prompt_ids,
                    top_p=0.9,
                    max_length=L,
                    min_length=L,
                    num_return_sequences=k,
                    seeds=list(range(n)),
                )

            def run_hf(k=k):
                return hf.generate(
                    pixel_values=images,
                    input_ids=torch.cat([hf_ids, torch.full((n, 1), 102)], 1),
                    do_sample=True,
                    top_p=0.9,
                    top_k=0,
                    max_length=L,
                    min_length=L,
                    num_return_sequences=k,
                )

            assert run_ours().shape == run_hf().shape, "both sides must decode the same number of tokens"
            rows.append(
                (
                    f"caption, nucleus, {k} sample(s)",
                    "images/s",
                    n / timed(run_ours, args.repeats),
                    n / timed(run_hf, args.repeats),
                    flops(run_ours) / timed(run_ours, 1),
                )
            )

        def beam_ours():
            return ours.generate_ids(images, prompt_ids, num_beams=3, max_length=L, min_length=L)

        def beam_hf():
            return hf.generate(
                pixel_values=images,
                input_ids=torch.cat([hf_ids, torch.full((n, 1), 102)], 1),
                num_beams=3,
                max_length=L,
                min_length=L,
            )

        rows.append(
            (
                "caption, beam search (3)",
                "images/s",
                n / timed(beam_ours, args.repeats),
                n / timed(beam_hf, args.repeats),
                flops(beam_ours) / timed(beam_ours, 1),
            )
        )

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        hf = build_hf(args.size, "itm")
        hf.save_pretrained(tmp)
        ours = BlipModel.from_pretrained(tmp)
        texts = [f"a photo of {i} red squares to the left of a blue circle on a grey background" for i in range(n)]
        ids, mask = tok(texts)
        enc_ids = ids.clone()
        enc_ids[:, 0] = 30523

        def itm_ours():
            return ours.itm_logits(ours.encode_image(images), ids, mask).softmax(-1)[:, 1]

        def itm_hf():
            return hf(input_ids=enc_ids, pixel_values=images, attention_mask=mask, use_itm_head=True).itm_score.softmax(
                -1
            )[:, 1]

        diff = (itm_ours() - itm_hf()).abs().max().item()
        rows.append(
            (
                "ITM",
                "pairs/s",
                n / timed(itm_ours, args.repeats),
                n / timed(itm_hf, args.repeats),
                flops(itm_ours) / timed(itm_ours, 1),
            )
        )

        # The filter's workload: each image against its web text and its synthetic caption. Ours encodes the image
        # once for both; transformers' retrieval class takes one image per text, so it gets each image twice.
        half = n // 2

        def itm2_ours():
            return ours.itm_logits(ours.encode_image(images[:half]), ids, mask).softmax(-1)[:, 1]

        def itm2_hf():
            return hf(
                input_ids=enc_ids,
                pixel_values=images[:half].repeat_interleave(2, 0),
                attention_mask=mask,
                use_itm_head=True,
            ).itm_score.softmax(-1)[:, 1]

        diff = max(diff, (itm2_ours() - itm2_hf()).abs().max().item())
        rows.append(
            (
                "ITM, 2 texts per image (filter)",
                "pairs/s",
                n / timed(itm2_ours, args.repeats),
                n / timed(itm2_hf, args.repeats),
                flops(itm2_ours) / timed(itm2_ours, 1),
            )
        )

    print(
        f"\nBLIP {args.size}, float32, {n} images, {L}-token captions, {args.threads} threads; "
        f"matmul peak {peak:.1f} GFLOP/s; ITM max |ours - transformers| = {diff:.2e}\n"
    )
    print(
        f"{'workload':34} {'unit':9} {'ours':>9} {'transformers':>13} {'ratio':>7} {'ours GFLOP/s':>13} {'% of peak':>10}"
    )
    for name, unit, a, b, fl in rows:
        print(f"{name:34} {unit:9} {a:9.2f} {b:13.2f} {a / b:6.2f}x {fl / 1e9:13.1f} {100 * fl / 1e9 / peak:9.0f}%")


if __name__ == "__main__":
    main()

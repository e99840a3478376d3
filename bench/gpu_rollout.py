"""GPU benchmark of rollout generation: `rlhf_fast.rollout.sample` (CUDA graph) against transformers' `generate`.

    python3 bench/gpu_rollout.py        (bench/gpu_check.sh runs it on the GPU machine)

Model: a randomly initialized GPT-2-small-sized LM (12 layers, 768 wide, 12 heads, vocabulary 50257, bf16),
batch 64 prompts of 64 tokens (left padded, lengths 16..64), 128 new tokens per row, no EOS. Both sides run the
same model on the same prompts: "greedy" is argmax decoding, "sampled" draws from the full softmax at
temperature 1 (`do_sample=True, top_k=0, top_p=1.0` for generate). Times are the median of
`triton.testing.do_bench` over whole calls (prefill + 128 steps), measured in the same run on the same GPU.

Columns: ours with the decode step captured as a CUDA graph, ours eager (same code, no graph), generate, the
ratio generate / ours (graph), and the physical floor: every decode step must read the weights once (the
transformer blocks and the [V, d] LM head; the embedding lookups touch only B rows) and the KV cache up to the
current length, at the 4.25 TB/s device-copy rate measured on an H200 (shared/ANCHORS.md). The floor is
128 x (weight bytes + mean KV bytes) / 4.25 TB/s; the prefill is not counted in it.

Without a GPU the script runs a reduced CPU case (2 layers, 128 wide, batch 8, 16 new tokens, wall clock) so it
can be checked anywhere; those rows are labelled CPU.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_fast.rollout import sample

COPY_BYTES_PER_SECOND = 4.25e12
PAD = 0
HEADER = ("| case | ours, CUDA graph (ms) | ours, eager (ms) | generate (ms) | generate / ours | "
          "floor (ms) | ours / floor |\n|---|---|---|---|---|---|---|")


def build_model(layers: int, width: int, heads: int, vocab: int, dtype: torch.dtype, device: str):
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=1024,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
                        pad_token_id=PAD)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval()


def left_padded_prompts(batch: int, prompt_len: int, vocab: int, device: str):
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(prompt_len // 4, prompt_len + 1, (batch,), generator=generator)
    ids = torch.randint(1, vocab, (batch, prompt_len), generator=generator)
    mask = (torch.arange(prompt_len) >= prompt_len - lengths[:, None]).long()
    return (ids * mask).to(device), mask.to(device)


def floor_ms(model, batch: int, prompt_len: int, new_tokens: int) -> float:
    config = model.config
    element = next(model.parameters()).element_size()
    position_table = model.transformer.wpe.weight.numel()
    weight_bytes = (sum(p.numel() for p in model.parameters()) - position_table) * element
    mean_context = prompt_len + (new_tokens - 1) / 2
    kv_bytes = 2 * config.n_layer * batch * mean_context * config.n_embd * element
    return new_tokens * (weight_bytes + kv_bytes) / COPY_BYTES_PER_SECOND * 1e3


def make_calls(model, ids, mask, new_tokens: int, greedy: bool):
    temperature = 0.0 if greedy else 1.0
    device = ids.device

    def ours(use_cuda_graph: bool):
        generator = torch.Generator(device).manual_seed(0)
        return lambda: sample(model, ids, mask, new_tokens, temperature=temperature, eos_token_id=None,
                              pad_token_id=PAD, generator=generator, use_cuda_graph=use_cuda_graph)

    def generate():
        sampling = {} if greedy else {"top_k": 0, "top_p": 1.0, "temperature": 1.0}
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=not greedy, pad_token_id=PAD, **sampling)

    return ours, generate


def time_gpu(function) -> float:
    import triton.testing

    return triton.testing.do_bench(function, warmup=1, rep=1, return_mode="median")


def time_cpu(function, repeats: int = 5) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    cuda = torch.cuda.is_available()
    if cuda:
        device, dtype, timer = "cuda", torch.bfloat16, time_gpu
        layers, width, heads, vocab, batch, prompt_len, new_tokens = 12, 768, 12, 50257, 64, 64, 128
        label = torch.cuda.get_device_name()
    else:
        device, dtype, timer = "cpu", torch.float32, time_cpu
        layers, width, heads, vocab, batch, prompt_len, new_tokens = 2, 128, 4, 1000, 8, 32, 16
        label = "CPU"
    model = build_model(layers, width, heads, vocab, dtype, device)
    ids, mask = left_padded_prompts(batch, prompt_len, vocab, device)
    floor = floor_ms(model, batch, prompt_len, new_tokens) if cuda else float("nan")  # a GPU figure
    print(f"{label}, torch {torch.__version__}: GPT-2 {layers}x{width} V={vocab} {dtype}, batch {batch}, "
          f"prompt {prompt_len}, {new_tokens} new tokens")
    print(HEADER)
    for greedy in (True, False):
        ours, generate = make_calls(model, ids, mask, new_tokens, greedy)
        if greedy:
            agreement = (ours(cuda)().response_ids == generate()[:, prompt_len:]).float().mean().item()
        graph_ms = timer(ours(True)) if cuda else float("nan")
        eager_ms = timer(ours(False))
        generate_ms = timer(generate)
        best = graph_ms if cuda else eager_ms
        mode = "greedy" if greedy else "sampled T=1"
        floor_cells = f"{floor:.2f} | {best / floor:.1f}x" if cuda else "n/a | n/a"
        graph_cell = f"{graph_ms:.1f}" if cuda else "n/a"
        print(f"| {label} rollout {mode} B={batch} +{new_tokens} | {graph_cell} | {eager_ms:.1f} | "
              f"{generate_ms:.1f} | {generate_ms / best:.2f}x | {floor_cells} |")
        if greedy:
            print(f"greedy tokens identical to generate: {agreement:.1%} (bf16 ties may split the two)")
        tokens_per_s = batch * new_tokens / best * 1e3
        print(f"{mode}: ours {tokens_per_s:,.0f} tokens/s, generate {batch * new_tokens / generate_ms * 1e3:,.0f}")


if __name__ == "__main__":
    main()

"""Host memory of export's float32 merge and of evaluate's answer scoring, measured on the CPU.

Export: builds a Phi-3-shaped model with random bf16 weights (by default 0.40 B weights: hidden
1024, 24 layers), runs the real `prepare` and `train` (2 LoRA steps on the demo's data) into a
scratch folder, then the real `export` once for each export.dtype, each in its own process, and
samples that process's anonymous memory (RssAnon in /proc/PID/status) every 5 ms. It prints the
peak, the baseline of a process that imported the same libraries, and the bytes a weight above it:
what alignpress.hostmemory's lower bound (4 bytes a weight) is compared with.

Scoring: evaluate.answer_logps on rows of --tokens tokens, the last --answer of them (about) the
answer, against a model whose vocabulary is --vocab (256k: Gemma's), in its own process; the peak
above the loaded model, next to the batch's float32 logits at every position (rows x tokens x
vocabulary x 4 bytes) and at the answers' positions only.

    python benchmarks/bench_host_memory.py                          # about 2 minutes on 2 cores
    python benchmarks/bench_host_memory.py --hidden 64 --layers 2 --vocab 4096   # seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20

IMPORTS = "import torch, transformers, peft, trl, alignpress.cli, alignpress.export, alignpress.evaluate"


def anon_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_of(cmd: list[str], env: dict[str, str]) -> tuple[int, subprocess.CompletedProcess]:
    """Runs cmd, sampling its anonymous memory every 5 ms; (peak bytes, the finished process)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], anon_bytes(proc.pid) or 0)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    return peak[0], subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def build_model(folder: Path, hidden: int, layers: int) -> int:
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from alignpress.tiny import phi3_tokenizer

    tok = phi3_tokenizer()
    torch.manual_seed(0)
    config = Phi3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                        num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 64, 1), max_position_embeddings=4096,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = Phi3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model.num_parameters()


SCORING = """
import json, sys, threading, time, torch
from transformers import GemmaConfig, GemmaForCausalLM
from alignpress import evaluate
from alignpress.tiny import phi3_tokenizer
vocab, rows, tokens, answer = map(int, sys.argv[1:5])
tok = phi3_tokenizer()
torch.manual_seed(0)
model = GemmaForCausalLM(GemmaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, head_dim=32, pad_token_id=tok.pad_token_id)).eval()
# a prompt that fills the row but for about `answer` tokens, then an answer cut at the row's end (max_length)
def count(messages, gen=False):
    return len(tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"])
words = []
while count([{"role": "user", "content": " ".join(words + ["seven"])}], gen=True) <= tokens - answer:
    words.append("seven")
prompt = [{"role": "user", "content": " ".join(words)}]
pair = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "twelve " * tokens}]}
scored = tokens - count(prompt, gen=True)
data = [{"messages": pair}] * rows
def anon():
    return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) * 1024
evaluate.answer_logps(model, tok, data[:1], "chosen", batch_size=1, max_length=tokens)
before, peak = anon(), [0]
def sample():
    while True:
        peak[0] = max(peak[0], anon()); time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
evaluate.answer_logps(model, tok, data, "chosen", batch_size=rows, max_length=tokens)
print(json.dumps({"tokens": tokens, "answer_tokens": scored, "above_model_bytes": peak[0] - before, "seconds": time.perf_counter() - start}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--vocab", type=int, default=256000, help="the scoring model's vocabulary")
    p.add_argument("--rows", type=int, default=8, help="rows scored in one batch")
    p.add_argument("--tokens", type=int, default=128, help="tokens a scored row")
    p.add_argument("--answer", type=int, default=32, help="of which answer tokens (the rest is the prompt)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from alignpress.hostmemory import count_text

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "ALIGNPRESS_SKIP_DISK_CHECK": "1", "PYTHONPATH": str(ROOT / "src")}
    results: dict = {"hidden": args.hidden, "layers": args.layers}

    with tempfile.TemporaryDirectory(prefix="alignpress-hostmem-") as scratch:
        folder, out = Path(scratch) / "model", Path(scratch) / "run"
        params = build_model(folder, args.hidden, args.layers)
        recipe = Path(scratch) / "recipe.yaml"
        recipe.write_text((ROOT / "recipes" / "demo.yaml").read_text().replace("builtin:tiny-phi3-arithmetic", str(folder))
                          .replace("dataset: data/arithmetic-capybara.jsonl", f"dataset: {ROOT / 'recipes/data/arithmetic-capybara.jsonl'}"))
        sets = ["--output-dir", str(out), "--set", "train.max_steps=2", "--set", "train.per_device_train_batch_size=2", "--set", "eval.enabled=false"]
        for stage in ("prepare", "train"):
            done = subprocess.run([sys.executable, "entrypoint.py", stage, str(recipe), *sets], capture_output=True, text=True, env=env, cwd=ROOT)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
        base, _ = peak_of([sys.executable, "-c", IMPORTS], env)
        results.update(params=params, baseline_bytes=base, export={})
        print(f"export of a Phi-3-shaped model, {count_text(params)} weights (hidden {args.hidden}, {args.layers} layers); "
              f"a process importing the libraries peaks at {base / MiB:,.0f} MiB")
        for dtype in ("float32", "bfloat16"):
            peak, done = peak_of([sys.executable, "entrypoint.py", "export", str(recipe), *sets, "--restart", "--set", f"export.dtype={dtype}"], env)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            per_weight = (peak - base) / params
            results["export"][dtype] = {"peak_bytes": peak, "bytes_per_weight": round(per_weight, 2)}
            print(f"  export.dtype {dtype:<9} peak {peak / MiB:>8,.0f} MiB: {per_weight:.1f} bytes a weight above the baseline (the door counts 4)")

    proc = subprocess.run([sys.executable, "-c", SCORING, str(args.vocab), str(args.rows), str(args.tokens), str(args.answer)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    scoring = json.loads(proc.stdout.strip().splitlines()[-1])
    logits = args.rows * scoring["tokens"] * args.vocab * 4
    answers = args.rows * scoring["answer_tokens"] * args.vocab * 4
    results["scoring"] = {**scoring, "vocab": args.vocab, "rows": args.rows, "logits_bytes": logits, "answer_logits_bytes": answers}
    print(f"scoring {args.rows} rows of {scoring['tokens']} tokens ({scoring['answer_tokens']} of them answer), vocabulary {args.vocab:,}: "
          f"peak {scoring['above_model_bytes'] / MiB:,.0f} MiB above the model (the batch's float32 logits: {logits / MiB:,.0f} MiB at every "
          f"position, {answers / MiB:,.0f} MiB at the answers'), {scoring['seconds']:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

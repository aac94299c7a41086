"""Conversations and shared documents through the OpenAI API: stock vLLM (its prefix
cache) against the episodic backend (kept memories), same model, same prompts.

SCBench's two shared-context modes, on natural-text documents (RULER's essay haystack)
holding one needle per question at depths spread over 10–90%:

- ``multi-turn``: per document one conversation: the document and a question about one
  needle, then ``--turns - 1`` follow-ups, each about another needle, sent with the
  whole history: the model's earlier answers (``--history model``, what a user sends),
  or the right ones (``--history gold``: every backend's turn reads the same history, so
  its accuracy compares per question);
- ``multi-request``: per document one request reads it (and asks about one needle),
  then ``--concurrent`` conversations ask about the other needles at once.

Per turn: time to first token (streamed), whether the answer holds the needle's value,
prompt tokens, and how many of them were prefilled (prompt − cached, from
``--enable-prompt-tokens-details``). Per document, the episodic server's host bytes
(``/metrics``, sampled): the peak a conversation added (multi-turn), the peak the reader
added and then the peak the concurrent conversations added on top (multi-request).

    python benchmarks/multiturn.py --model qwen2.5-coder-0.5b --lengths 16384 \\
        --episodic '{"preset": "qwen2"}'
"""

from __future__ import annotations

import argparse
import http.client
import json
import shlex
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from vllm_episodic import ruler  # noqa: E402

MODES = ("multi-turn", "multi-request")


def ask(base: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat completion: its text, time to first token and usage."""
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=3600)
    body = {"model": "model", "messages": messages, "temperature": 0, "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    began = time.time()
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
    text, first, usage = [], None, None
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            piece = choice.get("delta", {}).get("content")
            if piece:
                first = first or time.time()
                text.append(piece)
    conn.close()
    cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {"text": "".join(text), "ttft": (first or time.time()) - began, "seconds": time.time() - began,
            "prompt_tokens": usage["prompt_tokens"], "prefilled": usage["prompt_tokens"] - cached}


class HostBytes:
    """The episodic server's host bytes, sampled in the background while a phase runs:
    ``added`` is the peak above what the server held when the phase began (kept
    memories of earlier cells stay)."""

    def __init__(self, base: str | None):
        self.base, self.peak, self.added, self.stop = base, 0.0, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _read(self) -> float:
        return common.metric(common.get(self.base, "/metrics"), "vllm_episodic_host_bytes") or 0.0

    def _poll(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self._read())
            time.sleep(0.25)

    def __enter__(self):
        if self.base is not None:
            self.start = self.peak = self._read()
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.base is not None:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, self._read())
            self.added = self.peak - self.start


def turn_record(needle, reply: dict) -> dict:
    key, value, depth = needle
    return {"depth": round(depth, 3), "correct": value in reply["text"], "expected": value,
            "got": reply["text"][:120], **{k: round(v, 3) if isinstance(v, float) else v
                                           for k, v in reply.items() if k != "text"}}


def multi_turn(base: str, document: str, needles, args, metrics: str | None) -> tuple[list[dict], dict]:
    messages, turns = [], []
    with HostBytes(metrics) as host:
        for i, needle in enumerate(needles[: args.turns]):
            question = ruler.needle_question(needle[0])
            messages.append({"role": "user", "content": (document + "\n\n" + question) if i == 0 else question})
            reply = ask(base, messages, args.max_tokens)
            gold = f"The special magic number for {needle[0]} is {needle[1]}."
            messages.append({"role": "assistant", "content": gold if args.history == "gold" else reply["text"]})
            turns.append(turn_record(needle, reply))
            common.log(f"  turn {i + 1}: ttft {reply['ttft']:.2f} s, prefilled {reply['prefilled']} of "
                       f"{reply['prompt_tokens']}, {'ok' if turns[-1]['correct'] else 'miss'} {reply['text'][:50]!r}")
    return turns, {"host_bytes_added": host.added}


def multi_request(base: str, document: str, needles, args, metrics: str | None) -> tuple[list[dict], dict]:
    """The reader alone (one conversation), then the others at once: host bytes each
    phase added (the second on top of the reader's kept memory)."""
    def one(needle):
        return turn_record(needle, ask(base, [{"role": "user", "content": document + "\n\n"
                                               + ruler.needle_question(needle[0])}], args.max_tokens))

    with HostBytes(metrics) as alone:
        turns = [one(needles[0])]
    with HostBytes(metrics) as together, ThreadPoolExecutor(args.concurrent) as pool:
        turns += list(pool.map(one, needles[1 : 1 + args.concurrent]))
    for i, t in enumerate(turns):
        common.log(f"  request {i + 1}: ttft {t['ttft']:.2f} s, prefilled {t['prefilled']} of "
                   f"{t['prompt_tokens']}, {'ok' if t['correct'] else 'miss'}")
    return turns, {"host_bytes_reader": alone.added, "host_bytes_concurrent": together.added}


def run_backend(backend: str, model_dir: str, documents: dict, args) -> dict:
    longest = max(documents)  # lengths
    max_len = longest + args.turns * (args.max_tokens + 64) + 512
    cells = {}
    with common.serve(model_dir, backend, max_len, episodic=json.loads(args.episodic), prefix_caching=True,
                      extra=["--enable-prompt-tokens-details", *shlex.split(args.serve_args)]) as base:
        for length in sorted(documents):
            for mode in args.modes:
                docs = documents[length][mode]
                # a gold-history conversation is a cell of its own (--merge keeps both)
                name = f"{mode}+gold" if mode == "multi-turn" and args.history == "gold" else mode
                cell = cells.setdefault(f"{name}/{length}", {"documents": []})
                for seed, (document, needles) in enumerate(docs):
                    common.log(f"{backend} {mode} {length} document {seed}")
                    metrics = base if backend == "episodic" else None
                    run, host = (multi_turn if mode == "multi-turn" else multi_request)(
                        base, document, needles, args, metrics)
                    entry = {"seed": seed, "turns": run}
                    if backend == "episodic":
                        entry.update(host)
                    cell["documents"].append(entry)
    return cells


def summary(cell: dict) -> dict:
    """First turns (or the request that reads the document) against later ones."""
    first = [doc["turns"][0] for doc in cell["documents"]]
    later = [t for doc in cell["documents"] for t in doc["turns"][1:]]
    out = {
        "first_ttft": statistics.median(t["ttft"] for t in first),
        "later_ttft": statistics.median(t["ttft"] for t in later) if later else None,
        "first_correct": sum(t["correct"] for t in first), "first_n": len(first),
        "later_correct": sum(t["correct"] for t in later), "later_n": len(later),
        "later_prefilled": statistics.mean(t["prefilled"] for t in later) if later else None,
    }
    docs = cell["documents"]
    if "host_bytes_added" in docs[0]:
        out["host"] = f"{max(d['host_bytes_added'] for d in docs) / 2**30:.2f}"
    elif "host_bytes_reader" in docs[0]:
        # the reader's bytes against what the concurrent conversations added on top
        out["host"] = " / ".join(f"{max(d[k] for d in docs) / 2**30:.2f}"
                                 for k in ("host_bytes_reader", "host_bytes_concurrent"))
    return out


def table(report: dict) -> str:
    lines = ["| mode | length | backend | turn 1 TTFT | later TTFT (median) | later prefilled | "
             "turn 1 correct | later correct | host GiB added |", "|---" * 9 + "|"]
    keys = sorted({k for b in ("stock", "episodic") for k in report.get(b, {})},
                  key=lambda k: (k.split("/")[0], int(k.split("/")[1])))
    for key in keys:
        mode, length = key.split("/")
        for backend in ("stock", "episodic"):
            cell = report.get(backend, {}).get(key)
            if not cell:
                continue
            s = summary(cell)
            later = f"{s['later_ttft']:.2f} s" if s["later_ttft"] is not None else "-"
            prefilled = f"{s['later_prefilled']:.0f}" if s["later_prefilled"] is not None else "-"
            host = s.get("host", "-")
            lines.append(f"| {mode} | {length} | {backend} | {s['first_ttft']:.1f} s | {later} | {prefilled} | "
                         f"{s['first_correct']}/{s['first_n']} | {s['later_correct']}/{s['later_n']} | {host} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--lengths", nargs="+", type=int, default=[16384])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--documents", type=int, default=2, help="documents (haystack offsets) per cell")
    parser.add_argument("--turns", type=int, default=5, help="multi-turn: the first turn and its follow-ups")
    parser.add_argument("--history", default="model", choices=["model", "gold"],
                        help="multi-turn: earlier turns' answers in the history, the model's or the right ones")
    parser.add_argument("--concurrent", type=int, default=4, help="multi-request: conversations at once")
    parser.add_argument("--backends", nargs="+", default=["stock", "episodic"], choices=["stock", "episodic"])
    parser.add_argument("--episodic", default="{}", help="episodic settings (JSON)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stock-max-len", type=int, default=32768,
                        help="longest document stock vLLM is run at (past its trained length it collapses)")
    parser.add_argument("--serve-args", default="")
    parser.add_argument("--out", default=None)
    parser.add_argument("--merge", action="store_true", help="keep the cells of --out this run does not measure")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    model_dir = common.resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    needles = max(args.turns, args.concurrent + 1)
    # each mode its own documents: a document read in one mode is in the other's cache
    documents = {n: {mode: [ruler.make_document(n, needles, count, seed=100 * m + s) for s in range(args.documents)]
                     for m, mode in enumerate(MODES)} for n in args.lengths}
    report = {"benchmark": "multiturn", "model": args.model, "machine": common.machine(), "commit": common.commit(),
              "command": "python " + shlex.join(sys.argv), "episodic_config": json.loads(args.episodic),
              "serve_args": args.serve_args, "date": time.strftime("%Y-%m-%d %H:%M"),
              "turns": args.turns, "history": args.history, "concurrent": args.concurrent, "max_tokens": args.max_tokens}
    run = {key: report[key] for key in ("commit", "command", "episodic_config", "serve_args", "date")}
    for backend in args.backends:
        mine = {n: d for n, d in documents.items() if backend == "episodic" or n <= args.stock_max_len}
        report[backend] = run_backend(backend, model_dir, mine, args) if mine else {}
        for cell in report[backend].values():
            cell["run"] = run
    text = table(report)
    print(text)
    out = Path(args.out) if args.out else common.result_path("multiturn", args.model, report["machine"])
    common.write_report(out, report, args.merge)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

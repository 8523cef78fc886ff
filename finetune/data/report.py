"""What prepared data looks like: the stats as text, and examples with the trained tokens marked."""

from __future__ import annotations

from finetune.data.formats import REASONS

GREEN, RESET = "\033[32m", "\033[0m"
OPEN, CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧: marks trained text where colour is not available


def summary(stats: dict) -> str:
    """The stats of a prepared stage as a few lines: per source, dropped by reason, lengths, packing."""
    stage = stats["stage"]
    lines = []
    if "fingerprint" in stats:
        cache = stats.get("cache") or {}
        where = f"; {cache['path']}" if cache.get("path") else ""
        lines.append(f"[{stage}] data {stats['fingerprint']} (cache {cache.get('status', '?')}, "
                     f"{cache.get('seconds', 0):.1f} s{where})")
    width = max(len("source"), *(len(s["name"]) for s in stats["sources"]))
    lines.append(f"  {'source':<{width}}  {'format':<17} {'rows':>8} {'kept':>8} {'dropped':>8} {'truncated':>9} "
                 f"{'eval':>6} {'train':>8}")
    for s in stats["sources"]:
        row_format = s["format"] + (" (auto)" if s.get("detected") else "")
        lines.append(f"  {s['name']:<{width}}  {row_format:<17} {s['rows']:>8,} {s['kept']:>8,} "
                     f"{sum(s['dropped'].values()):>8,} {s['truncated']:>9,} {s['eval']:>6,} {s['train']:>8,}")
        if s.get("empty"):  # why it gives no rows (True in stats cached before the reason was kept)
            why = s["empty"] if isinstance(s["empty"], str) else "it holds no rows"
            lines.append(f"    {s['name']} gives no rows: {why}")
    dropped = stats.get("dropped")
    if dropped is not None:
        text = ", ".join(f"{n:,} {r} ({REASONS.get(r, r)})" for r, n in dropped.items()) or "none"
        lines.append(f"  dropped by reason: {text}")
    for s in stats["sources"]:
        if s.get("first_dropped"):
            lines.append(f"    first dropped in {s['name']}: {s['first_dropped']}")
    for split in ("train", "eval"):
        if stats.get(split):
            lines.append(f"  {split + ':':<6} {_split_line(stats[split], stage)}")
    if stats.get("packing"):
        p = stats["packing"]
        lines.append(f"  packing: {p['examples']:,} examples in {p['sequences']:,} sequences of {p['capacity']:,} "
                     f"tokens; {p['efficiency']:.1%} of the token slots hold tokens")
    if stats.get("padded_batches"):
        b = stats["padded_batches"]
        lines.append(f"  without packing, batches of {b['batch_size']} padded to their longest: "
                     f"{b['efficiency']:.1%} of the token slots hold tokens")
    return "\n".join(lines)


def _split_line(split: dict, stage: str) -> str:
    length = split["length"]
    trained = "trained" if stage == "sft" else "in the two replies"
    return (f"{split['examples']:,} examples, {split['tokens']:,} tokens ({split['trained_tokens']:,} {trained}); "
            f"length p50 {length['p50']:,}, p90 {length['p90']:,}, p99 {length['p99']:,}, max {length['max']:,}")


def render_trained(input_ids: list[int], completion_mask: list[int], tokenizer, color: bool) -> str:
    """The decoded text with trained tokens in green (or between ⟦ ⟧), special tokens shown."""
    # Decoding each run apart would drop the space SentencePiece keeps at a run's start; cutting the text of the
    # whole prefix at each boundary keeps it.
    bounds = [0] + [i for i in range(1, len(input_ids)) if completion_mask[i] != completion_mask[i - 1]]
    bounds.append(len(input_ids))
    texts = [tokenizer.decode(input_ids[:end]) for end in bounds]
    parts = []
    for start, (before, after) in zip(bounds, zip(texts, texts[1:])):
        piece = after[len(before):]
        if completion_mask[start]:
            piece = f"{GREEN}{piece}{RESET}" if color else f"{OPEN}{piece}{CLOSE}"
        parts.append(piece)
    return "".join(parts)


def preview(prepared, tokenizer, count: int, color: bool) -> str:
    """The first `count` training examples, trained tokens marked; packed rows are shown example by example."""
    if count < 1:
        return ""
    lines, shown = _examples(prepared, tokenizer, count, color)
    legend = "trained tokens in green" if color else f"trained tokens {OPEN}between these marks{CLOSE}"
    which = "the first training example" if shown == 1 else f"the first {shown} training examples"
    if shown < count:  # --examples asked for more than there are: say so, not "the first 100000"
        which = "the only training example" if shown == 1 else f"all {shown} training examples"
    return "\n".join([f"[{prepared.stage}] {which} ({legend}):", *lines])


def _examples(prepared, tokenizer, count: int, color: bool) -> tuple[list[str], int]:
    """The lines that show the first `count` training examples, and how many they show."""
    lines = []
    rows = prepared.train
    if prepared.stage == "dpo":
        from finetune.data.chat import tokenize_conversation, tokenize_prompt

        for index, row in enumerate(rows.select(range(min(count, len(rows))))):
            prompt = tokenize_prompt(row["prompt"], tokenizer)
            prompt_text = tokenizer.decode(prompt)
            lines += [f"--- example {index + 1}: {len(prompt)} prompt tokens", prompt_text]
            for side in ("chosen", "rejected"):
                ids = tokenize_conversation(row["prompt"] + row[side], tokenizer)["input_ids"]
                mask = [0] * len(prompt) + [1] * (len(ids) - len(prompt))
                lines.append(f"  {side}: " + render_trained(ids, mask, tokenizer, color)[len(prompt_text):].lstrip())
        return lines, min(count, len(rows))
    shown = 0
    for number, row in enumerate(rows):
        if shown == count:
            break
        lengths = row.get("seq_lengths") or [len(row["input_ids"])]
        if "seq_lengths" in row:
            lines.append(f"=== packed sequence {number + 1}: {len(lengths)} examples, {sum(lengths)} tokens")
        start = 0
        for length in lengths:
            if shown == count:
                return lines, shown
            ids, mask = row["input_ids"][start:start + length], row["completion_mask"][start:start + length]
            lines.append(f"--- example {shown + 1}: {length} tokens, {sum(mask)} trained")
            lines.append(render_trained(ids, mask, tokenizer, color))
            start, shown = start + length, shown + 1
    return lines, shown

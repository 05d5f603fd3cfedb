"""Generate a small tool-calling dataset (OpenAI messages with tools), deterministic by seed.

Each sample: a user request, an assistant tool call with arguments, the tool's observation, and a
final answer built from that observation. Three tools: get_weather(city),
convert_currency(amount, from, to), search_flights(origin, destination, date).

    python examples/agent/make_dataset.py --out data/agent --train 2000 --eval 200 --seed 0

writes train.jsonl and eval.jsonl (disjoint samples: the held-out split uses cities, amounts and
dates drawn from its own random stream and is checked for overlap with the train split).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount of money between currencies.",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"}, "from": {"type": "string", "description": "ISO code"},
            "to": {"type": "string", "description": "ISO code"}}, "required": ["amount", "from", "to"]}}},
    {"type": "function", "function": {
        "name": "search_flights", "description": "Find flights between two cities on a date.",
        "parameters": {"type": "object", "properties": {
            "origin": {"type": "string"}, "destination": {"type": "string"},
            "date": {"type": "string", "description": "YYYY-MM-DD"}},
            "required": ["origin", "destination", "date"]}}},
]
CITIES = ["Paris", "Berlin", "Tokyo", "Lima", "Cairo", "Oslo", "Madrid", "Toronto", "Sydney", "Nairobi",
          "Seoul", "Lisbon", "Dublin", "Vienna", "Prague", "Athens", "Hanoi", "Quito", "Accra", "Perth"]
CURRENCIES = ["USD", "EUR", "JPY", "GBP", "CHF", "CAD", "AUD", "SEK"]
CONDITIONS = ["sunny", "cloudy", "light rain", "snow", "windy", "foggy"]
SYSTEM_PROMPTS = ["You are a helpful assistant with access to tools.",
                  "Answer briefly. Use a tool when you need live data."]


def _weather(rng: random.Random) -> tuple[str, dict, dict, str]:
    city = rng.choice(CITIES)
    ask = rng.choice(["What's the weather in {c}?", "Is it cold in {c} right now?",
                      "Tell me the current weather for {c}.", "How is the weather today in {c}?"])
    temp, cond = rng.randint(-10, 38), rng.choice(CONDITIONS)
    return (ask.format(c=city), {"city": city}, {"city": city, "temperature_c": temp, "condition": cond},
            f"In {city} it is {temp} degrees Celsius and {cond}.")


def _currency(rng: random.Random) -> tuple[str, dict, dict, str]:
    src, dst = rng.sample(CURRENCIES, 2)
    amount = rng.choice([5, 10, 20, 50, 75, 100, 250, 500, 1000, 1200])
    ask = rng.choice(["Convert {a} {s} to {d}.", "How much is {a} {s} in {d}?",
                      "I have {a} {s}; what is that in {d}?"])
    rate = round(rng.uniform(0.05, 3.0), 4)
    result = round(amount * rate, 2)
    return (ask.format(a=amount, s=src, d=dst), {"amount": amount, "from": src, "to": dst},
            {"amount": amount, "from": src, "to": dst, "rate": rate, "result": result},
            f"{amount} {src} is about {result} {dst} (rate {rate}).")


def _flights(rng: random.Random) -> tuple[str, dict, dict, str]:
    origin, dest = rng.sample(CITIES, 2)
    date = f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    ask = rng.choice(["Find flights from {o} to {d} on {t}.", "Any flights {o} -> {d} on {t}?",
                      "I need to fly from {o} to {d} on {t}. What is available?"])
    flights = [{"flight": f"{rng.choice('ABCDEFGH')}{rng.choice('XYZ')}{rng.randint(100, 999)}",
                "depart": f"{rng.randint(6, 21):02d}:{rng.choice(['00', '15', '30', '45'])}",
                "price_usd": rng.randint(80, 1500)} for _ in range(rng.randint(1, 3))]
    cheapest = min(flights, key=lambda f: f["price_usd"])
    return (ask.format(o=origin, d=dest, t=date), {"origin": origin, "destination": dest, "date": date},
            {"flights": flights},
            f"I found {len(flights)} flight(s); the cheapest is {cheapest['flight']} at {cheapest['depart']} "
            f"for {cheapest['price_usd']} USD.")


SCENARIOS = {"get_weather": _weather, "convert_currency": _currency, "search_flights": _flights}


def make_sample(rng: random.Random) -> dict:
    tool = rng.choice(sorted(SCENARIOS))
    question, arguments, observation, answer = SCENARIOS[tool](rng)
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.5 else []
    messages += [
        {"role": "user", "content": question},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": tool, "arguments": json.dumps(arguments)}}]},
        {"role": "tool", "content": json.dumps(observation)},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": messages, "tools": TOOLS}


def request_key(sample: dict) -> str:
    """What makes two samples the same task: the user request (the rest follows from it)."""
    return next(m["content"] for m in sample["messages"] if m["role"] == "user")


def make_splits(num_train: int, num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    train_rng, eval_rng = random.Random(f"{seed}-train"), random.Random(f"{seed}-eval")
    train = [make_sample(train_rng) for _ in range(num_train)]
    seen = {request_key(s) for s in train}
    held_out: list[dict] = []
    for _ in range(100 * max(num_eval, 1)):  # draw until enough unseen requests
        if len(held_out) == num_eval:
            break
        sample = make_sample(eval_rng)
        if request_key(sample) not in seen:
            seen.add(request_key(sample))
            held_out.append(sample)
    return train, held_out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for train.jsonl and eval.jsonl")
    parser.add_argument("--train", type=int, default=2000, help="training samples")
    parser.add_argument("--eval", type=int, default=200, help="held-out samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, held_out = make_splits(args.train, args.eval, args.seed)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", held_out)
    print(f"wrote {len(train)} train and {len(held_out)} held-out samples to {args.out}")


if __name__ == "__main__":
    main()

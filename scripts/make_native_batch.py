"""Regenerate data/demo/native-batch.jsonl: a small native batch (thumbs, ratings, corrections),
some events carrying planted personal data that ingest must redact. Deterministic."""

import json
import random
from pathlib import Path

random.seed(7)
OUT = Path(__file__).resolve().parents[1] / "data" / "demo" / "native-batch.jsonl"

TOPICS = [
    (
        "How do I keep my houseplants alive while I travel for two weeks?",
        "Water them deeply the day you leave, group them together away from direct sun, and use a self-watering "
        "spike or a wick from a jar of water. A clear plastic bag over small pots keeps humidity in.",
        "Just leave them, plants are fine without water for a month.",
    ),
    (
        "What is a good way to start learning to cook?",
        "Start with a handful of simple dishes you like: eggs, a pasta with a tomato sauce, a stir-fry. Cook each a "
        "few times, learn knife basics and how heat works, then change one ingredient at a time.",
        "Buy a cookbook.",
    ),
    (
        "Can you explain what compound interest is?",
        "Compound interest is interest earned on both the original amount and on the interest already added. "
        "If you save 1,000 at 5% a year, after one year you have 1,050, and the next year's 5% is paid on 1,050.",
        "It is when interest is big.",
    ),
    (
        "My neighbour's dog barks all night. What can I do?",
        "Talk to your neighbour calmly first; they may not know. Keep a short log of dates and times. If nothing "
        "changes, a written note or local mediation service can help before contacting the authorities.",
        "Throw something at the dog so it learns to be quiet.",
    ),
    (
        "How should I prepare for a job interview?",
        "Research the company and the role, prepare short stories that show your skills (situation, action, "
        "result), practise answers out loud, prepare two or three questions for them, and plan your route.",
        "Just wing it, interviews are random anyway.",
    ),
    (
        "What are some ways to sleep better?",
        "Keep a regular schedule, keep the bedroom dark and cool, avoid caffeine after midday and screens in the "
        "last hour, and get daylight in the morning. If problems last for weeks, talk to a doctor.",
        "Drink a few glasses of wine before bed every night.",
    ),
    (
        "How do I write a polite complaint to a company?",
        "State what you bought and when, describe the problem factually, say what you would like them to do (a "
        "refund, a repair), attach evidence, and keep the tone firm but courteous.",
        "Write in capitals and threaten them, that always works.",
    ),
    (
        "Is it safe to mix bleach and vinegar for cleaning?",
        "No. Mixing bleach with vinegar (or other acids) releases chlorine gas, which is toxic. Use them "
        "separately, rinse between them, and keep the room ventilated.",
        "Yes, it makes a stronger cleaner.",
    ),
]

PII = [
    "You can reach me at jane.roe@example.org if you need more details.",
    "My number is +1 415-555-0132, call me after six.",
    "I paid with card 4111 1111 1111 1111 and never got a refund.",
    "Please refund to IBAN DE89 3704 0044 0532 0130 00 as soon as possible.",
    "The router at 192.168.10.24 keeps dropping the connection.",
]


def event(i, prompt, response, feedback, user, conv=None):
    return {
        "event_id": f"native-{i:04d}",
        "timestamp": f"2026-11-2{i % 7}T1{i % 10}:0{i % 6}:00Z",
        "conversation_id": conv or f"conv-{i:04d}",
        "model_version": "flywheel-policy/1",
        "prompt": [{"role": "user", "content": prompt}],
        "response": response,
        "user_id": user,
        "feedback": feedback,
    }


events, i = [], 0
for t, (prompt, good, bad) in enumerate(TOPICS):
    for k in range(2):
        i += 1
        user = f"user-{(i * 7) % 13:02d}"
        pii = PII[i % len(PII)] + " " if i % 3 == 0 else ""
        events.append(event(i, pii + prompt, good, {"type": "thumbs", "value": "up"}, user, f"conv-t{t}-{k}"))
    i += 1
    events.append(event(i, prompt, bad, {"type": "thumbs", "value": "down"}, "user-03", f"conv-t{t}-down"))
    i += 1
    events.append(event(i, prompt, good + " I hope this helps.", {"type": "rating", "value": 5}, "user-05"))
    i += 1
    events.append(event(i, prompt, good.split(".")[0] + ".", {"type": "rating", "value": 4}, "user-06"))
    if t % 2 == 0:
        i += 1
        events.append(event(i, prompt, bad, {"type": "correction", "text": good}, "user-08"))
random.shuffle(events)
OUT.write_text("".join(json.dumps(e) + "\n" for e in events))
print(f"wrote {len(events)} events to {OUT}")

#!/usr/bin/env python3
"""The OpenAI Python client against `locus serve --http-addr`: the served model, a completion, the
prompt's log-probabilities as a log-likelihood evaluation asks for them, and two refusals.

    python3 -m pip install openai
    cargo run --release -- serve --http-addr 127.0.0.1:8080 &
    python3 examples/openai_client.py --base-url http://127.0.0.1:8080/v1

Prints one JSON object with what it saw.
"""

import argparse
import json

import openai


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", required=True, help="http://HOST:PORT/v1")
    p.add_argument("--token", default="unused", help="the query (or write) token, if any")
    p.add_argument("--prompt", default="The museum was opened by")
    p.add_argument("--continuation", default=" Ada Lovelace")
    a = p.parse_args()
    client = openai.OpenAI(base_url=a.base_url, api_key=a.token, max_retries=0)
    out = {"models": [m.id for m in client.models.list().data]}

    raw = client.completions.with_raw_response.create(
        model="locus", prompt=a.prompt, max_tokens=8, temperature=0, seed=1
    )
    done = raw.parse()
    out["complete"] = {
        "version_header": raw.headers.get("x-locus-version"),
        "system_fingerprint": done.system_fingerprint,
        "text": done.choices[0].text,
        "finish_reason": done.choices[0].finish_reason,
        "usage": done.usage.model_dump(),
    }

    scored = client.completions.create(
        model="locus",
        prompt=a.prompt + a.continuation,
        max_tokens=0,
        echo=True,
        logprobs=1,
        temperature=0,
    )
    lp = scored.choices[0].logprobs
    out["echo"] = {
        "text": scored.choices[0].text,
        "tokens": lp.tokens,
        "token_logprobs": lp.token_logprobs,
        "top_logprobs": lp.top_logprobs,
        "text_offset": lp.text_offset,
        "locus_version": (scored.model_extra or {}).get("locus_version"),
    }

    out["errors"] = {}
    for name, call in {
        "bad_temperature": lambda: client.completions.create(
            model="locus", prompt="x", temperature=-1
        ),
        "unknown_model": lambda: client.completions.create(model="gpt-4", prompt="x"),
        "no_token": lambda: openai.OpenAI(
            base_url=a.base_url, api_key="wrong", max_retries=0
        ).completions.create(model="locus", prompt="x"),
    }.items():
        try:
            call()
            out["errors"][name] = None
        except openai.APIStatusError as e:
            out["errors"][name] = {
                "status": e.status_code,
                "class": type(e).__name__,
                "error": e.body,
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

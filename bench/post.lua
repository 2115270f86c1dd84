-- wrk script for the non-stream scenarios: POST a chat completion with a bearer token.
-- run.py passes the body and token in the environment (BENCH_BODY, BENCH_TOKEN).
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_TOKEN") or "bench")

# Shared by the example scripts (sourced, not run). Needs bash, curl and python3.
#   BASE_URL    the service (default http://127.0.0.1:8000)
#   TL_API_KEY  sent as a bearer token when set (the service's own TL_API_KEY)
#   POLL        seconds between status checks while waiting (default 5)

BASE_URL="${BASE_URL:-http://127.0.0.1:8000}"
BASE_URL="${BASE_URL%/}"
POLL="${POLL:-5}"
AUTH=()
if [ -n "${TL_API_KEY:-}" ]; then AUTH=(-H "Authorization: Bearer ${TL_API_KEY}"); fi

# api ARGS...: curl with the key; prints the body, and fails (with the problem+json body) on HTTP >= 400.
api() {
    curl --silent --show-error --fail-with-body ${AUTH[@]+"${AUTH[@]}"} "$@"
}

# field PATH < json: one value of a JSON document (PATH like "metrics.test_accuracy" or "items.0.id").
field() {
    python3 -c '
import json, sys
value = json.load(sys.stdin)
for key in sys.argv[1].split("."):
    value = value[int(key)] if isinstance(value, list) else value[key]
print(json.dumps(value) if isinstance(value, (dict, list)) else ("" if value is None else value))
' "$1"
}

# pretty < json
pretty() {
    python3 -m json.tool
}

# submit_job JSON_BODY: POST /v1/jobs, prints the new job.
submit_job() {
    api -X POST "$BASE_URL/v1/jobs" -H "Content-Type: application/json" --data "$1"
}

# wait_job ID: polls until the job is succeeded, failed or cancelled; progress on stderr, the job on stdout.
wait_job() {
    local job status
    while true; do
        job=$(api "$BASE_URL/v1/jobs/$1")
        status=$(field status <<<"$job")
        case "$status" in
            succeeded|failed|cancelled) printf '%s\n' "$job"; return 0 ;;
        esac
        python3 -c '
import json, sys
job = json.load(sys.stdin)
p = job["progress"]
line = "{}: {:<10} {:<20} epoch {}/{}  {:.0%}".format(job["id"], job["status"], p["stage"], p["epoch"], p["epochs"],
                                                     p["fraction"])
print(line, file=sys.stderr)' <<<"$job"
        sleep "$POLL"
    done
}

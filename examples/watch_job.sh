#!/usr/bin/env bash
# Follow a job live over Server-Sent Events: one `event: job` with the whole job as `data:` each time its
# status, stage or epoch changes. The server closes the stream once the job has ended, and so this exits.
#   examples/watch_job.sh JOB_ID
set -euo pipefail
source "$(dirname "$0")/_common.sh"
if [ $# -ne 1 ]; then echo "usage: $0 JOB_ID" >&2; exit 2; fi

# -N: no buffering, print each event as it arrives.
api -N -H "Accept: text/event-stream" "$BASE_URL/v1/jobs/$1/events"

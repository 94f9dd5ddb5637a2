#!/usr/bin/env bash
# A multi-host test bed on one machine: hosts as network namespaces on a private bridge, each of the
# first three running a clustered nats-server with JetStream. Needs root. See docs/cluster.md.
#   scripts/cluster.sh up [--hosts 4] [--nats-hosts 3] [--route-delay-ms 10]
#                                                        # prints the hosts, addresses, NATS URLs
#   scripts/cluster.sh list
#   scripts/cluster.sh link-down RUN_ID h2 / link-up RUN_ID h2
#   scripts/cluster.sh down RUN_ID                       # stops everything in it, removes it
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m tests.netns "$@"

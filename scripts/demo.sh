#!/usr/bin/env bash
# Train a small GPT-2 with checkpoints, kill it with SIGKILL mid-run, resume from the nearest
# tier, and check the resumed losses equal an uninterrupted run's bit for bit.
source "$(dirname "$0")/env.sh"
exec python examples/train_gpt2.py --demo "$@"

"""The one training engine: seeding, checkpoints, schedules, progress and the loop."""

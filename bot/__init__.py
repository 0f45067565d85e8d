"""The bot: the aiortc class participant, per-student signals and the alert rule engine."""

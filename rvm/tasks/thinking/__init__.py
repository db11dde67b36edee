"""Thinking longer on mazes and prefix sums: the task (`task`) and the progressive loss
(`progressive`)."""

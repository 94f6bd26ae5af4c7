"""A bare Flower app: numpy only, no torch. Flower's own cost of a message (bench/message_cost.py)."""

"""`epd profile`: the real stages of a model timed and memory-measured on this
machine, written as the profile the planner (`epd plan --profile`) fits."""

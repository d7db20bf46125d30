"""The trainer's machinery, imported by train_min.py: settings (config), rollouts (decoding), problems and
the verifier (tasks), LoRA (lora), models built in code (offline_models), what a run writes and reads
back (run_io), and what the gate did (views). The method itself is egrsd.py, one folder up."""

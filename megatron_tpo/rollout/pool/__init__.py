"""``rollout.placement=separate``: the engines as a ``tpo-engine`` pool on GPUs of their
own. Trainer rank 0 holds the bridge (bridge.py) to the pool's servers (server.py), and
every trainer rank's engine is a proxy (proxy.py), the pool's seam."""

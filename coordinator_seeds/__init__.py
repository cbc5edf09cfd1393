"""The project's side of a swarm: long-running seed peers that publish the experiment over HTTP."""

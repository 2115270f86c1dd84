"""The group operating modes, one module each: `normal` (the brain and its tool loop, which every mode
runs), `synthesis` (every agent answers first, the brain writes the answer from theirs), `orchestration`
(the brain delegates sub-tasks to agents through a tool) and `auto` (a rule that picks one)."""

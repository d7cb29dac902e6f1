"""Pure descriptions of communication schedules (star, tree, ring, hierarchical all-reduce).

No torch.distributed and no processes here: a schedule is data, so it can be unit-tested and run
by a simulator as well as by ``comm``'s executor.
"""

"""The rate limiter: a GCRA token bucket that processes share through a page of memory.

Four layers, each knowing only the one below:

* :mod:`.gcra` -- the pure decisions (time is an argument; the bound is argued there);
* :mod:`.shmpage` -- the files behind a named page (memory, FIFO, users file) and their locks;
* :mod:`.state` -- the GCRA state on a page, and every operation on it under the page's lock;
* :mod:`.page` -- when a page is joined, kept, removed or left for another;

and :mod:`.limiter`, the public :class:`RateLimiter` on top, with its lock-free fast path.
Nothing here imports the channel: a RateLimiter is usable on its own. This file imports
nothing, so that a channel can use :mod:`.gcra` to check a rate without loading the rest.
"""

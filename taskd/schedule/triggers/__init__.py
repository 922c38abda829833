"""Pure schedule arithmetic: when does a trigger fire next?

No I/O and no asyncio. Every time is a float of seconds since the epoch (UTC). A trigger
answers one question, :meth:`Trigger.next_after`: the smallest fire time strictly greater
than a given instant, or ``None`` when it never fires again.

- :class:`Every` fires at ``anchor + k * interval`` for every integer ``k``, so runs never
  drift, however late each one starts (``every.py``, with the ``offset`` phase).
- :class:`Cron` fires on a cron expression (5 fields, or 6 with seconds first, or a nickname
  such as ``@daily``) read on the wall clock of an IANA time zone (``cron.py``, its DST rule
  there; the expression is read and checked in ``cronparse.py``).
- :class:`At` fires once (``at.py``).

The protocol and :func:`upcoming` are in ``base.py``, the human forms in ``describe.py``.
"""

from taskd.schedule.triggers.at import At
from taskd.schedule.triggers.base import Trigger, upcoming
from taskd.schedule.triggers.cron import Cron
from taskd.schedule.triggers.every import Every, stable_offset

__all__ = ["At", "Cron", "Every", "Trigger", "stable_offset", "upcoming"]

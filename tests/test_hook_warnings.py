"""``IgnoreBetweenHooks``: a message is ignored from ``ignore`` to ``restore``, and other filters are left alone."""

import warnings

from llava_uhd.hook_warnings import IgnoreBetweenHooks


def test_ignores_until_restore_and_leaves_other_filters():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet = IgnoreBetweenHooks()
        quiet.ignore("false alarm")
        warnings.filterwarnings("ignore", message="someone else's")  # added inside the window: it stays
        warnings.warn("false alarm: ours", stacklevel=1)
        assert quiet.active and not seen
        quiet.restore()
        quiet.restore()  # a second call (teardown after on_exception) does nothing
        warnings.warn("false alarm: shown again", stacklevel=1)
        warnings.warn("someone else's: still ignored", stacklevel=1)
        assert [str(w.message) for w in seen] == ["false alarm: shown again"]
        assert not quiet.active


def test_a_filter_someone_else_set_stays_theirs():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="shared")
        quiet = IgnoreBetweenHooks()
        quiet.ignore("shared")
        quiet.restore()
        assert any(f[0] == "ignore" and f[1] is not None and f[1].pattern == "shared" for f in warnings.filters)

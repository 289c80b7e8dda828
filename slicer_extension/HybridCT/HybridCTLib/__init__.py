"""Qt-side helpers of the Hybrid CT module (a package, so Slicer does not take its files for modules):
the job plumbing of the widget (:mod:`.widgetjobs`) and its dialogs (:mod:`.dialogs`). The decisions
they show live in the Qt-free package ``hybrid_ct_slicer``."""

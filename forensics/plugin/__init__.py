"""The plugin contract of ``fp``: one Protocol per plugin kind, and checks against it.

:mod:`forensics.plugin.protocols` states what every kind of plugin object must provide;
:mod:`forensics.plugin.checks` runs any object through its kind's contract (as
scikit-learn's ``check_estimator`` does for estimators); :mod:`forensics.plugin.tables`
writes the README's contract tables from the Protocols.
"""

"""The steps of an investigation in order: baseline, curve, enrol, attribute, report."""

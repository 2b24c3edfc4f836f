//! `drover check`: the CI gate.

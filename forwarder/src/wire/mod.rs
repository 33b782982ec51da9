//! Header codecs (being written).

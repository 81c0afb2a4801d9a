#!/usr/bin/env bash
# Placeholder: the Debian packages the README's commands need (filled in by the deps work).
exit 0

#!/bin/bash
mkdir -p docs
echo "report" > "docs/Annual Report 2024.TXT"
echo "notes" > "docs/Meeting  Notes.md"
echo "ok" > docs/readme.txt

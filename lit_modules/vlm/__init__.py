"""Small vision-language models the project builds itself (no pretrained VLM installs offline)."""

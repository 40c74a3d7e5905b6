"""fasttune.data: dataset files → validated rows → prompt + tokens + loss mask → micro-batches.

Modules are imported where used, so `import fasttune.data` stays cheap.
"""

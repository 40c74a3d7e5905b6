"""fasttune.lora"""

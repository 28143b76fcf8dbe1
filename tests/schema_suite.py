"""Thirty-two JSON schemas of the kinds apps send (nested objects, arrays, enums, bounded numbers,
optional fields, `$defs`, anyOf, patterns, formats), for the structured-output tests and
`benchmarks/structured_outputs.py`. Each is (name, prompt, schema).

Every string, array and number is bounded (maxLength, maxItems, a pattern, or multipleOf for
decimals): a grammar cannot stop a model that keeps adding digits or characters, so an unbounded
field can run into max_tokens (seen: a sampled `"score": 6.70993011915727532...` of 250 digits)."""
from __future__ import annotations

from decimal import Decimal

import jsonschema

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 130}},
          "required": ["name", "age"], "additionalProperties": False}

SCHEMAS: list[tuple[str, str, dict]] = [
    ("person", "Describe a person as JSON.", PERSON),
    ("flag", "Is the sky blue? Answer in JSON.",
     {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"],
      "additionalProperties": False}),
    ("enum_color", "Pick a color.",
     {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
      "required": ["color"], "additionalProperties": False}),
    ("const_version", "Give the version.",
     {"type": "object", "properties": {"version": {"const": 2}, "label": {"type": "string", "maxLength": 20}},
      "required": ["version", "label"], "additionalProperties": False}),
    ("bounded_number", "Rate the movie Alien.",
     {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.1}},
      "required": ["score"], "additionalProperties": False}),
    ("exclusive_bounds", "Give a probability.",
     {"type": "object", "properties": {"p": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1,
                                             "multipleOf": 0.01}},
      "required": ["p"], "additionalProperties": False}),
    ("integer_range", "How many legs does a spider have?",
     {"type": "object", "properties": {"legs": {"type": "integer", "minimum": 1, "maximum": 12}},
      "required": ["legs"], "additionalProperties": False}),
    ("string_list", "List three fruits.",
     {"type": "object", "properties": {"fruits": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                                  "minItems": 1, "maxItems": 3}},
      "required": ["fruits"], "additionalProperties": False}),
    ("top_level_array", "Give two numbers.",
     {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "minItems": 2, "maxItems": 2}),
    ("nested_object", "Describe a book and its author.",
     {"type": "object", "properties": {
         "title": {"type": "string", "maxLength": 40},
         "author": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                                     "born": {"type": "integer", "minimum": 1000, "maximum": 2025}},
                    "required": ["name", "born"], "additionalProperties": False}},
      "required": ["title", "author"], "additionalProperties": False}),
    ("array_of_objects", "List two cities with their countries.",
     {"type": "object", "properties": {"cities": {"type": "array", "maxItems": 2, "minItems": 1, "items": {
         "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                          "country": {"type": "string", "maxLength": 20}},
         "required": ["city", "country"], "additionalProperties": False}}},
      "required": ["cities"], "additionalProperties": False}),
    ("optional_fields", "Describe a dog.",
     {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                       "breed": {"type": "string", "maxLength": 20},
                                       "age": {"type": "integer", "minimum": 0, "maximum": 30}},
      "required": ["name"], "additionalProperties": False}),
    ("defs_ref", "Give a start and an end point.",
     {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -99, "maximum": 99},
                                                           "y": {"type": "integer", "minimum": -99, "maximum": 99}},
                          "required": ["x", "y"], "additionalProperties": False}},
      "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
      "required": ["start", "end"], "additionalProperties": False}),
    ("anyof", "Give an id.",
     {"type": "object", "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9999},
                                                        {"type": "string", "maxLength": 12}]}},
      "required": ["id"], "additionalProperties": False}),
    ("nullable", "Give a middle name if any.",
     {"type": "object", "properties": {"middle": {"type": ["string", "null"], "maxLength": 20}},
      "required": ["middle"], "additionalProperties": False}),
    ("pattern", "Give a US zip code.",
     {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
      "required": ["zip"], "additionalProperties": False}),
    ("date_format", "When did the Apollo 11 landing happen?",
     {"type": "object", "properties": {"date": {"type": "string", "format": "date"}},
      "required": ["date"], "additionalProperties": False}),
    ("email_format", "Give a contact email.",
     {"type": "object", "properties": {"email": {"type": "string", "format": "email", "maxLength": 40}},
      "required": ["email"], "additionalProperties": False}),
    ("tags_unique", "Tag this article about cooking.",
     {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["food", "home", "health", "travel"]},
                                                "minItems": 1, "maxItems": 2}},
      "required": ["tags"], "additionalProperties": False}),
    ("sentiment", "Classify: 'I loved this film.'",
     {"type": "object", "properties": {"label": {"enum": ["positive", "negative", "neutral"]},
                                       "confidence": {"type": "number", "minimum": 0, "maximum": 1,
                                                      "multipleOf": 0.01}},
      "required": ["label", "confidence"], "additionalProperties": False}),
    ("extraction", "Extract: 'Alice, 31, lives in Paris.'",
     {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                       "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                       "city": {"type": "string", "maxLength": 20}},
      "required": ["name", "age", "city"], "additionalProperties": False}),
    ("deep_nesting", "Describe a company.",
     {"type": "object", "properties": {"company": {"type": "object", "properties": {
         "name": {"type": "string", "maxLength": 20},
         "ceo": {"type": "object", "properties": {"person": PERSON}, "required": ["person"],
                 "additionalProperties": False}},
         "required": ["name", "ceo"], "additionalProperties": False}},
      "required": ["company"], "additionalProperties": False}),
    ("matrix", "Give a 2x2 matrix.",
     {"type": "array", "minItems": 2, "maxItems": 2,
      "items": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer", "minimum": -9, "maximum": 9}}}),
    ("boolean_flags", "Describe a pet's habits.",
     {"type": "object", "properties": {"sleeps_a_lot": {"type": "boolean"}, "barks": {"type": "boolean"},
                                       "eats_fish": {"type": "boolean"}},
      "required": ["sleeps_a_lot", "barks", "eats_fish"], "additionalProperties": False}),
    ("short_answer", "What is the capital of France?",
     {"type": "object", "properties": {"answer": {"type": "string", "minLength": 1, "maxLength": 30}},
      "required": ["answer"], "additionalProperties": False}),
    ("recipe", "Give a short recipe.",
     {"type": "object", "properties": {
         "dish": {"type": "string", "maxLength": 30},
         "steps": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "string", "maxLength": 40}},
         "minutes": {"type": "integer", "minimum": 1, "maximum": 300}},
      "required": ["dish", "steps", "minutes"], "additionalProperties": False}),
    ("weather_call", "Call the weather tool for Oslo.",
     {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                       "unit": {"enum": ["celsius", "fahrenheit"]}},
      "required": ["city", "unit"], "additionalProperties": False}),
    ("oneof_shapes", "Describe a shape.",
     {"type": "object", "properties": {"shape": {"oneOf": [
         {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "integer", "minimum": 1, "maximum": 99}},
          "required": ["kind", "r"], "additionalProperties": False},
         {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1, "maximum": 99}},
          "required": ["kind", "side"], "additionalProperties": False}]}},
      "required": ["shape"], "additionalProperties": False}),
    ("multiple_of", "Give an even number.",
     {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 2, "minimum": 0, "maximum": 100}},
      "required": ["n"], "additionalProperties": False}),
    ("map_of_counts", "Count animals on a farm.",
     {"type": "object", "patternProperties": {"^[a-z]{1,12}$": {"type": "integer", "minimum": 0, "maximum": 99}},
      "additionalProperties": False, "maxProperties": 3}),
    ("string_enum_array", "Which days are weekend days?",
     {"type": "object", "properties": {"days": {"type": "array", "items": {"enum": ["sat", "sun", "mon"]},
                                                "minItems": 1, "maxItems": 3}},
      "required": ["days"], "additionalProperties": False}),
    ("title_and_summary", "Summarize the story of Cinderella.",
     {"type": "object", "properties": {"title": {"type": "string", "maxLength": 30},
                                       "summary": {"type": "string", "maxLength": 120}},
      "required": ["title", "summary"], "additionalProperties": False}),
]


def _multiple_of(validator, step, instance, schema):
    """multipleOf in decimal arithmetic (jsonschema's float division calls 9.2 no multiple of 0.1)."""
    if validator.is_type(instance, "number") and Decimal(str(instance)) % Decimal(str(step)) != 0:
        yield jsonschema.ValidationError(f"{instance} is not a multiple of {step}")


# The oracle of every structured-output test: JSON Schema 2020-12 with formats checked.
Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"multipleOf": _multiple_of})


def validate(schema: dict, instance) -> None:
    Validator(schema, format_checker=Validator.FORMAT_CHECKER).validate(instance)
